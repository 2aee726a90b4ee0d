"""Projections of object latents (Figures 24 to 29): `projection_arrays` matches objects
to slots and projects their latents (torch, SciPy, scikit-learn; no matplotlib),
`draw_projection` draws them, `projection` writes both (`write_figure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import figures  # the package: functions are called through it, so a patched one is the one called
from ..data import DATASETS, DatasetError, load_images
from ..run import Run
from .files import FigureFiles, png_path
from .inputs import Opened, final, open_run, set_seed, to_numpy

# Factors drawn with a discrete palette even when numeric, for a store of no known dataset
# (a known dataset's description says which of its factors are categorical).
CATEGORICAL = frozenset({"shape", "color", "material", "size"})
RGB_NAMES = {(1, 0, 0): "red", (0, 1, 0): "green", (0, 0, 1): "blue", (1, 1, 0): "yellow",
             (1, 0, 1): "magenta", (0, 1, 1): "cyan", (1, 1, 1): "white", (0, 0, 0): "black"}


def projection(run: Run | str | Path, out: str | Path, *, num_images: int = 256, seed: int = 0,
               data: str | Path | None = None, num_iters: int | None = None,
               device: str = "cpu", batch_size: int = 32) -> FigureFiles:
    """Object latents projected on their first two principal components and with t-SNE.

    Mirrors the paper's Figures 24 to 26 (PCA, top row) and 27 to 29 (t-SNE, bottom row),
    one column per ground-truth factor of the dataset, each dot an object coloured by that
    factor (a legend for categories, a colour bar for continuous factors; the ``color``
    factor is drawn in the object's own colour). Each ground-truth object (mask group 1 and
    up, visible and non-empty) of the first ``num_images`` images is matched to one slot by
    maximising the summed IoU of its mask with the final step's soft slot masks (Hungarian
    assignment); the object's latent is that slot's posterior mean.
    """
    png = png_path(out)
    _check_counts(num_images, batch_size)
    run = open_run(run, data, device, "projection")
    arrays = figures.projection_arrays(run, num_images=num_images, seed=seed, num_iters=num_iters,
                                       device=device, batch_size=batch_size)
    factors = [k[len("factor_"):] for k in arrays if k.startswith("factor_")]   # the dataset's order
    M, n = len(arrays["latent"]), min(num_images, run.ds.sizes["image"])
    spec = DATASETS.get(str(run.ds.attrs.get("dataset", "")))
    title = f"Object latents of {M} objects in {n} images, {final(run.system)}: {run.title()}"
    categorical = spec.categorical if spec else CATEGORICAL
    return figures.write_figure(arrays, png, lambda path: figures.draw_projection(
        arrays, factors, path, title=title, categorical=categorical))


def _check_counts(num_images: int, batch_size: int) -> None:
    if num_images < 1 or batch_size < 1:
        raise ValueError("--num-images and the batch size must be at least 1")


def projection_arrays(run: Opened | Run | str | Path, *, num_images: int = 256, seed: int = 0,
                      data: str | Path | None = None, num_iters: int | None = None, device: str = "cpu",
                      batch_size: int = 32) -> dict[str, np.ndarray]:
    """The arrays of `projection` (its data file), computed without drawing: one row per
    object matched to a slot, its factors, and the latents' PCA and t-SNE (``seed``)."""
    # scikit-learn for this figure only: importing it with the toolkit would add a second
    # to every command that draws (fit's pictures among them)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    _check_counts(num_images, batch_size)
    run = open_run(run, data, device, "projection")
    n = min(num_images, run.ds.sizes["image"])
    factors = [k for k in run.ds.data_vars if k not in ("image", "mask", "visibility")]
    if not factors:
        raise DatasetError(f"{run.data} has no per-object factors to colour the projection by")
    set_seed(seed)
    rows = _matched_objects(run, n, num_iters, device, batch_size)
    M = len(rows["latent"])
    if M < 5:
        raise ValueError(f"only {M} objects found in {n} images; pass a larger --num-images")
    arrays = {k: np.asarray(v) for k, v in rows.items()}
    arrays["latent"] = arrays["latent"].astype(np.float32)           # [M, n_z]
    for name in factors:
        values = run.ds[name][:n].values                              # [n, G] or [n, G, 3]
        arrays[f"factor_{name}"] = values[arrays["image_index"], arrays["group"]]
    pca = PCA(n_components=2, svd_solver="full")
    arrays["pca"] = pca.fit_transform(arrays["latent"]).astype(np.float32)       # [M, 2]
    arrays["pca_explained"] = pca.explained_variance_ratio_.astype(np.float32)   # [2]
    perplexity = float(min(30.0, max(2.0, (M - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(limits=1, user_api="openmp"):  # one thread: the same result every time
        arrays["tsne"] = tsne.fit_transform(arrays["latent"]).astype(np.float32)  # [M, 2]
    return arrays


def _matched_objects(run: Opened, n: int, num_iters: int | None, device: str,
                     batch_size: int) -> dict[str, list]:
    """Every ground-truth object (mask group 1 and up, visible and non-empty) of the first
    `n` images matched to one slot of the final step (Hungarian assignment on the IoU of
    its mask with the soft slot masks): the slot's posterior mean, image, group, slot, IoU."""
    from scipy.optimize import linear_sum_assignment   # SciPy for this figure only, as scikit-learn

    n_z = run.cfg.model.latent_dim
    visibility = run.ds["visibility"][:n].values if "visibility" in run.ds else None  # [n, G]
    rows: dict[str, list] = {"latent": [], "image_index": [], "group": [], "slot": [], "iou": []}
    for start in range(0, n, batch_size):
        batch = load_images(run.ds, start, min(start + batch_size, n))
        true = batch["mask"].to(device)                               # true: [B, G, H, W]
        last = run.system.infer(batch["image"].to(device), num_iters=num_iters)[-1]
        inter = torch.einsum("bghw,bkhw->bgk", true, last.masks)      # [B, G, K]
        union = true.sum((2, 3))[:, :, None] + last.masks.sum((2, 3))[:, None] - inter
        iou = to_numpy(inter / union.clamp_min(1e-9))                 # [B, G, K]
        present = to_numpy(true.sum((2, 3))) > 0                      # [B, G]
        for b in range(true.shape[0]):
            i = start + b
            groups = [g for g in range(1, true.shape[1])
                      if present[b, g] and (visibility is None or visibility[i, g] > 0)]
            if not groups:
                continue
            gi, ks = linear_sum_assignment(-iou[b, groups])
            for g_idx, k in zip(gi, ks):
                g = groups[g_idx]
                rows["latent"].append(to_numpy(last.lam[b, k, :n_z]))
                rows["image_index"].append(i)
                rows["group"].append(g)
                rows["slot"].append(int(k))
                rows["iou"].append(float(iou[b, g, k]))
    return rows


def _rgb_factor(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """[M, 3] colours (0..1 or 0..255) -> dot colours [M, 3] and a name per object."""
    from matplotlib import colors as mcolors

    rgb = values / 255.0 if values.max() > 1 else values.astype(float)
    names = [RGB_NAMES.get(tuple(int(v) for v in c), mcolors.to_hex(c))
             if np.allclose(c, np.round(c)) else mcolors.to_hex(np.clip(c, 0, 1)) for c in rgb]
    return np.clip(rgb, 0, 1), names


def _factor_style(name: str, values: np.ndarray, categorical: frozenset[str] = CATEGORICAL) -> str:
    """How to colour a factor: ``rgb``, ``categorical`` or ``continuous``."""
    if values.ndim == 2:
        return "rgb"
    integral = np.allclose(values, np.round(values))
    unique = len(np.unique(values))
    if (name in categorical and unique <= 20) or (integral and unique <= 10):
        return "categorical"
    return "continuous"


def _scatter_factor(fig, ax, xy: np.ndarray, name: str, values: np.ndarray,
                    categorical: frozenset[str] = CATEGORICAL) -> None:
    from matplotlib import colors as mcolors

    from .drawing import plt

    if values.ndim == 2 and values.shape[1] != 3:          # e.g. binarized sprites: 1-channel colour
        values = values[:, 0] if values.shape[1] == 1 else values.mean(1)
    style = _factor_style(name, values, categorical)
    common = {"s": 14, "alpha": 0.85, "edgecolors": "0.25", "linewidths": 0.3}
    if style == "rgb":
        dots, names = _rgb_factor(values)
        for label in sorted(set(names)):
            sel = np.array([n == label for n in names])
            ax.scatter(xy[sel, 0], xy[sel, 1], c=dots[sel], label=label, **common)
        if len(set(names)) <= 12:
            ax.legend(title=name, fontsize=6, title_fontsize=7, loc="best", markerscale=1.2)
    elif style == "categorical":
        cats = np.unique(values)
        index = np.searchsorted(cats, values)                         # [M]
        if len(cats) <= 10:
            palette = plt.get_cmap("tab10")
            for j, cat in enumerate(cats):
                sel = index == j
                ax.scatter(xy[sel, 0], xy[sel, 1], color=palette(j), label=f"{cat:g}", **common)
            ax.legend(title=name, fontsize=6, title_fontsize=7, loc="best", ncol=2 if len(cats) > 5 else 1)
        else:
            cmap = mcolors.ListedColormap(plt.get_cmap("tab20").colors[:len(cats)])
            norm = mcolors.BoundaryNorm(np.arange(len(cats) + 1) - 0.5, len(cats))
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=index, cmap=cmap, norm=norm, **common)
            cb = fig.colorbar(sc, ax=ax, ticks=np.arange(len(cats)), pad=0.01)
            cb.ax.set_yticklabels([f"{c:g}" for c in cats], fontsize=6)
            cb.set_label(name, fontsize=7)
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap="viridis", **common)
        cb = fig.colorbar(sc, ax=ax, pad=0.01)
        cb.ax.tick_params(labelsize=6)
        cb.set_label(name, fontsize=7)


def draw_projection(a: dict[str, np.ndarray], factors: Sequence[str], png: Path, title: str,
                    categorical: frozenset[str] = CATEGORICAL) -> None:
    """Draw the arrays of `projection`: PCA (top row) and t-SNE (bottom row), one column per factor."""
    from .drawing import plt

    F = len(factors)
    fig, axes = plt.subplots(2, F, figsize=(3.6 * F + 0.4, 6.8), squeeze=False, layout="constrained")
    ev = a["pca_explained"]
    for j, name in enumerate(factors):
        values = a[f"factor_{name}"]
        for r, (key, method) in enumerate([("pca", "PCA"), ("tsne", "t-SNE")]):
            ax = axes[r, j]
            _scatter_factor(fig, ax, a[key], name, values, categorical)
            ax.set_title(f"{method}, coloured by {name}", fontsize=9)
            if key == "pca":
                ax.set_xlabel(f"PC 1 ({100 * ev[0]:.0f}% of variance)", fontsize=8)
                ax.set_ylabel(f"PC 2 ({100 * ev[1]:.0f}% of variance)", fontsize=8)
            else:
                ax.set_xlabel("t-SNE 1", fontsize=8)
                ax.set_ylabel("t-SNE 2", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    figures.save_figure(fig, png)
