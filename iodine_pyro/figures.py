"""The paper's figures of trained runs, each written as a PNG and the data behind it.

=================  ===============  ==============  ==========================================
kind               function         paper figures   data file next to ``FILE.png``
=================  ===============  ==============  ==========================================
decomposition      `decomposition`  16 to 19        ``FILE.npz``: ``image`` [N, C, H, W],
                                                    ``recon`` [N, S, C, H, W], ``masks``
                                                    [N, S, K, H, W], ``means`` [N, S, K, C, H, W],
                                                    ``step`` [S] (1-based refinement steps),
                                                    ``image_index`` [N]
sequence           `sequence`       12              ``FILE.npz``: ``image``, ``recon``
                                                    [F, C, H, W], ``masks`` [F, K, H, W],
                                                    ``true_masks`` [F, G, H, W], ``frame`` [F],
                                                    ``image_index``
mask-logits        `mask_logits`    20 to 22        ``FILE.npz``: ``image`` [N, C, H, W],
                                                    ``masks``, ``mask_logits`` [N, K, H, W],
                                                    ``true_masks`` [N, G, H, W], ``image_index``
traversal          `traversal`      30 to 32        ``FILE.npz``: ``image`` [C, H, W],
                                                    ``image_index``, ``slot``, ``posterior_mean``
                                                    [K, n_z], ``kl`` [n_z], ``dims`` [D] (the
                                                    rows: most KL first), ``offsets`` [V]
                                                    (prior sd), ``values`` [D, V], ``renders``
                                                    [D, V, C, H, W] (rows in ``dims`` order),
                                                    ``recon`` [C, H, W], ``slot_mask`` [H, W]
projection         `projection`     24 to 29        ``FILE.npz``: one row per matched object:
                                                    ``latent`` [M, n_z], ``pca`` [M, 2],
                                                    ``pca_explained`` [2], ``tsne`` [M, 2],
                                                    ``image_index``, ``group``, ``slot``, ``iou``
                                                    [M], ``factor_<name>`` [M] or [M, 3]
curves             `curves`         (training)      ``FILE.json``: ``{"keys", "smooth", "runs":
                                                    [{"label", "run_dir", "step": [...],
                                                    "loss": [...], ...}]}`` (null for missing)
ablation           `ablation`       33 to 40        ``FILE.json``: as curves, one run per
                                                    ablation (``full``, ``no-<input>``)
=================  ===============  ==============  ==========================================

Figures that run the model take a `iodine_pyro.run.Run` (or what `Run.open` takes: a run
directory, a checkpoint file, ``pretrained:NAME``) and read the run's held-out images
unless ``data`` names another dataset. This module is the package's one figure toolkit:
`fit`'s pictures, the ``plot`` figures, multi-stability, the guide comparison and ``data
show`` all draw with it. Every random choice
(posterior samples, the traversal's image and slot, t-SNE) follows ``seed``, so the same
arguments give the same PNG, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch.distributions import kl_divergence  # noqa: E402

from .checkpoint import METRICS, read_metrics  # noqa: E402
from .data import DATASETS, DatasetError, is_sequence, load_images  # noqa: E402
from .io import atomic_file, commit, discard, stage_npz, stage_text  # noqa: E402
from .run import IMAGES, SEQUENCES, Run  # noqa: E402
from .system import Iodine  # noqa: E402

__all__ = [
    "FigureFiles", "decomposition", "sequence", "mask_logits", "traversal", "projection", "curves",
    "ablation", "ablation_runs", "save_figure", "slot_colors",
]

DPI = 100
TRAVERSAL_DIMS = 8          # latent dimensions a traversal shows by default: those with most KL
CURVE_KEYS = ("loss", "mse", "kl", "fg_ari")
# metrics.jsonl key -> (panel title, y-axis label); the metrics are of one training batch
# at the final refinement step, the loss is the training objective sum_t w_t L_t.
CURVE_LABELS = {
    "loss": ("total loss", "weighted negative ELBO (nats)"),
    "mse": ("reconstruction MSE", "MSE, final step"),
    "kl": ("KL divergence", "KL, final step (nats)"),
    "fg_ari": ("segmentation FG-ARI", "FG-ARI, final step"),
    "ari": ("segmentation ARI", "ARI, final step"),
}
# Factors drawn with a discrete palette even when numeric, for a store of no known dataset
# (a known dataset's description says which of its factors are categorical).
CATEGORICAL = frozenset({"shape", "color", "material", "size"})
RGB_NAMES = {(1, 0, 0): "red", (0, 1, 0): "green", (0, 0, 1): "blue", (1, 1, 0): "yellow",
             (1, 0, 1): "magenta", (0, 1, 1): "cyan", (1, 1, 1): "white", (0, 0, 0): "black"}


@dataclass(frozen=True)
class FigureFiles:
    """The files a figure wrote: the PNG and the data behind it."""

    png: Path
    data: Path


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------


def save_figure(fig, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` to `path` (creating its folder) and close it: whole or not at all, and
    together with the data file staged for it (`iodine_pyro.io`: temporary files, then
    renames; a full disk or a read-only folder leaves neither file and names the path;
    never through a link)."""
    path = Path(path)
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=path.suffix.lower().lstrip(".") or None)
    except BaseException:
        discard(path)
        raise
    finally:
        plt.close(fig)
    commit(path)
    return path


def slot_colors(num_slots: int) -> np.ndarray:
    """[K, 3] distinct colours, the same for a given K everywhere."""
    cmap = plt.get_cmap("tab10" if num_slots <= 10 else "tab20")
    return np.array([cmap(k % cmap.N)[:3] for k in range(num_slots)])


@dataclass
class _Opened:
    """A run with the dataset a figure reads."""

    run: Run
    ds: Any
    data: str

    @property
    def system(self) -> Iodine:
        return self.run.system

    @property
    def cfg(self):
        return self.run.cfg

    def title(self) -> str:
        return self.run.title()


def _png_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    return out


def _data_path(png: Path, suffix: str) -> Path:
    """The data file next to `png`: staged (`iodine_pyro.io.stage_npz`, `stage_text`) and put
    in place only together with the PNG (`save_figure`)."""
    return png.with_suffix(suffix)


def _open(run: Run | str | Path, data: str | Path | None, device: str, kind: str) -> _Opened:
    """A run and its data; ``kind`` (the plot's name) must suit the data: `sequence` draws
    sequences, every other kind single images."""
    run = run if isinstance(run, Run) else Run.open(run, device)
    need = {"sequence": SEQUENCES, "decomposition": None}.get(kind, IMAGES)   # fit draws sequence runs too
    ds, where = run.dataset(data, need=need, command=f"plot {kind}")
    return _Opened(run, ds, where)


def _first_images(run: _Opened, num_images: int, device: str) -> dict[str, torch.Tensor]:
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    n = min(num_images, run.ds.sizes["image"])
    return {k: v.to(device) for k, v in load_images(run.ds, 0, n).items()}


def _seed(seed: int) -> None:
    pyro.set_rng_seed(seed)  # torch, numpy and random


def _rgb(a: np.ndarray) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, 3] for imshow."""
    a = np.clip(a, 0, 1).transpose(1, 2, 0)                     # [H, W, C]
    return np.repeat(a, 3, 2) if a.shape[2] == 1 else a


def _segmentation(masks: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """masks [K, H, W] -> [H, W, 3], each pixel coloured by its argmax slot."""
    return colors[masks.argmax(0)]


def _over_white(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """picture [C, H, W] shown where mask [H, W] is on, white elsewhere -> [H, W, 3]."""
    return _rgb(mask[None] * picture + (1 - mask[None]))


def _show(ax, picture, title: str | None = None, border=None, **kw):
    im = ax.imshow(picture, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    if border is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(border)
            spine.set_linewidth(3)
    return im


def _save(fig, png: Path) -> None:
    save_figure(fig, png, dpi=DPI)


def _final(system: Iodine, steps: int | None = None) -> str:
    """What the last step of a guide is, for titles: a refinement step, or one encoder pass."""
    if not system.guide.refines:
        return f"the {system.guide.kind} guide's one-shot posterior"
    return "final refinement step" + (f" ({steps})" if steps else "")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------
# Decomposition (Figures 16 to 19)
# ---------------------------------------------------------------------------------------


def decomposition(run: Run | str | Path, out: str | Path, *, num_images: int = 4,
                  all_steps: bool = False, seed: int = 0, data: str | Path | None = None,
                  num_iters: int | None = None, device: str = "cpu") -> FigureFiles:
    """Image, reconstruction, segmentation and each slot's masked reconstruction.

    Mirrors the paper's Figures 16 to 19: one row per image, columns image,
    reconstruction sum_k pi_k mu_k, segmentation (argmax slot, coloured), then each slot's
    mean mu_k shown where its mask pi_k is on (white elsewhere), framed in the slot's
    segmentation colour. With ``all_steps`` every refinement step gets a row (Figure 7's
    iterations), otherwise only the final step.
    """
    png = _png_path(out)
    run = _open(run, data, device, "decomposition")
    sequence = is_sequence(run.ds)
    if sequence and all_steps:
        raise ValueError("a sequence run's steps are its frames: draw them with plot sequence")
    x = _first_images(run, num_images, device)["image"]           # x: [N, C, H, W] (or [N, F, C, H, W])
    _seed(seed)
    steps = run.system.infer(x, num_iters=num_iters)
    shown = list(range(len(steps))) if all_steps else [len(steps) - 1]
    if sequence:                                                  # the final step reads frame F
        x = x[:, len(steps) - 1]                                  # x: [N, C, H, W]
    arrays = {
        "image": _np(x),                                                        # [N, C, H, W]
        "recon": _np(torch.stack([steps[t].recon for t in shown], 1)),          # [N, S, C, H, W]
        "masks": _np(torch.stack([steps[t].masks for t in shown], 1)),          # [N, S, K, H, W]
        "means": _np(torch.stack([steps[t].means for t in shown], 1)),          # [N, S, K, C, H, W]
        "step": np.array(shown) + 1,                                            # [S]
        "image_index": np.arange(x.shape[0]),                                   # [N]
    }
    data_path = _data_path(png, ".npz")
    stage_npz(data_path, arrays, companion=png)
    which = "every refinement step" if all_steps else _final(run.system, len(steps))
    if sequence:
        which += f", frame {len(steps)} of each sequence"
    draw_decomposition(arrays, png, title=f"Decomposition, {which}: {run.title()}")
    return FigureFiles(png, data_path)


def draw_decomposition(a: dict[str, np.ndarray], png: Path, title: str,
                       row_labels: Sequence[str] | None = None) -> None:
    """Draw the arrays of `decomposition` (one row per image and shown step; `row_labels`
    replace the images' "image i")."""
    N, S, K = a["masks"].shape[:3]
    colors = slot_colors(K)
    cols = 3 + K
    fig, axes = plt.subplots(N * S, cols, figsize=(1.5 * cols + 0.4, 1.55 * N * S + 0.6),
                             squeeze=False, layout="constrained")
    for i in range(N):
        for s in range(S):
            row = axes[i * S + s]
            top = i == 0 and s == 0
            masks, means = a["masks"][i, s], a["means"][i, s]              # [K, H, W], [K, C, H, W]
            _show(row[0], _rgb(a["image"][i]), "image" if top else None)
            _show(row[1], _rgb(a["recon"][i, s]), "reconstruction" if top else None)
            _show(row[2], _segmentation(masks, colors), "segmentation" if top else None)
            for k in range(K):
                _show(row[3 + k], _over_white(means[k], masks[k]), f"slot {k}" if top else None,
                      border=colors[k])
            label = row_labels[i] if row_labels is not None else f"image {a['image_index'][i]}"
            if S > 1:
                label += f"\nstep {a['step'][s]}"
            row[0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, png)


# ---------------------------------------------------------------------------------------
# Sequences (Figure 12)
# ---------------------------------------------------------------------------------------


def sequence(run: Run | str | Path, out: str | Path, *, image: int = 0, seed: int = 0,
             data: str | Path | None = None, num_iters: int | None = None,
             device: str = "cpu") -> FigureFiles:
    """Frames, reconstructions, segmentations and each slot's mask over time (Figure 12).

    One column per frame (one refinement step each); rows: the frame, the reconstruction
    sum_k pi_k mu_k, the segmentation (argmax slot, coloured), the true segmentation, then
    the mask pi_k of every slot, framed in its colour: a tracked object stays in one row.
    Data (``FILE.npz``): ``image``, ``recon`` [F, C, H, W], ``masks`` [F, K, H, W],
    ``true_masks`` [F, G, H, W], ``frame`` [F] (1-based), ``image_index``.
    """
    png = _png_path(out)
    run = _open(run, data, device, "sequence")
    n = run.ds.sizes["image"]
    if not 0 <= image < n:
        raise ValueError(f"--image {image} is outside the {n} sequences of {run.data}")
    batch = {k: v.to(device) for k, v in load_images(run.ds, image, image + 1).items()}
    _seed(seed)
    steps = run.system.infer(batch["image"], num_iters=num_iters)           # one step per frame
    F_ = len(steps)
    arrays = {
        "image": _np(batch["image"][0, :F_]),                                  # [F, C, H, W]
        "recon": _np(torch.stack([s.recon[0] for s in steps])),                 # [F, C, H, W]
        "masks": _np(torch.stack([s.masks[0] for s in steps])),                 # [F, K, H, W]
        "true_masks": _np(batch["mask"][0, :F_]),                               # [F, G, H, W]
        "frame": np.arange(F_) + 1,                                             # [F]
        "image_index": np.array(image),
    }
    data_path = _data_path(png, ".npz")
    stage_npz(data_path, arrays, companion=png)
    draw_sequence(arrays, png, title=f"Sequence {image}, one refinement step per frame\n{run.title()}")
    return FigureFiles(png, data_path)


def draw_sequence(a: dict[str, np.ndarray], png: Path, title: str) -> None:
    """Draw the arrays of `sequence`: frames along columns, slots along rows."""
    F_, K = a["masks"].shape[:2]
    colors = slot_colors(K)
    true_colors = slot_colors(a["true_masks"].shape[1])
    rows = 4 + K
    fig, axes = plt.subplots(rows, F_, figsize=(1.1 * F_ + 0.8, 1.15 * rows + 0.6), squeeze=False,
                             layout="constrained")
    labels = ["frame", "reconstruction", "segmentation", "true segmentation"] + [f"slot {k}" for k in range(K)]
    for t in range(F_):
        col = axes[:, t]
        _show(col[0], _rgb(a["image"][t]), f"t={a['frame'][t]}")
        _show(col[1], _rgb(a["recon"][t]))
        _show(col[2], _segmentation(a["masks"][t], colors))
        true = a["true_masks"][t]                                               # [G, H, W]
        _show(col[3], np.where(true.any(0)[..., None], _segmentation(true, true_colors), 1.0))
        for k in range(K):
            _show(col[4 + k], a["masks"][t, k], border=colors[k], cmap="gray", vmin=0, vmax=1)
    for r, label in enumerate(labels):
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, png)


# ---------------------------------------------------------------------------------------
# Masks and mask logits (Figures 20 to 22)
# ---------------------------------------------------------------------------------------


def mask_logits(run: Run | str | Path, out: str | Path, *, num_images: int = 4, seed: int = 0,
                data: str | Path | None = None, num_iters: int | None = None,
                device: str = "cpu") -> FigureFiles:
    """Predicted masks over the image, ground-truth masks and per-slot mask logits.

    Mirrors the paper's Figures 20 to 22, two rows per image at the final refinement step.
    First row: the image, the predicted segmentation, then each slot's mask pi_k over the
    image (white where the mask is off), framed in the slot's colour. Second row: the
    image, the ground-truth segmentation, then each slot's raw mask logit m_k on one colour
    scale per image (colour bar on the right).
    """
    png = _png_path(out)
    run = _open(run, data, device, "mask-logits")
    batch = _first_images(run, num_images, device)
    x = batch["image"]                                               # x: [N, C, H, W]
    _seed(seed)
    last = run.system.infer(x, num_iters=num_iters)[-1]
    arrays = {
        "image": _np(x),                                             # [N, C, H, W]
        "masks": _np(last.masks),                                    # [N, K, H, W]
        "mask_logits": _np(last.mask_logits),                        # [N, K, H, W]
        "true_masks": _np(batch["mask"]),                            # [N, G, H, W]
        "image_index": np.arange(x.shape[0]),                        # [N]
    }
    data_path = _data_path(png, ".npz")
    stage_npz(data_path, arrays, companion=png)
    draw_mask_logits(arrays, png, title=f"Masks and mask logits, {_final(run.system)}: {run.title()}")
    return FigureFiles(png, data_path)


def draw_mask_logits(a: dict[str, np.ndarray], png: Path, title: str) -> None:
    """Draw the arrays of `mask_logits` (two rows per image)."""
    N, K = a["masks"].shape[:2]
    G = a["true_masks"].shape[1]
    colors, true_colors = slot_colors(K), slot_colors(G)
    cols = 2 + K
    fig, axes = plt.subplots(2 * N, cols, figsize=(1.5 * cols + 1.2, 3.0 * N + 0.6), squeeze=False,
                             layout="constrained")
    for i in range(N):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        image = a["image"][i]                                        # [C, H, W]
        _show(top[0], _rgb(image), "image")
        _show(top[1], _segmentation(a["masks"][i], colors), "predicted masks")
        for k in range(K):
            _show(top[2 + k], _over_white(image, a["masks"][i, k]), f"mask {k}", border=colors[k])
        logits = a["mask_logits"][i]                                 # [K, H, W]
        lo, hi = float(logits.min()), float(logits.max())
        _show(bottom[0], _rgb(image), "image")
        _show(bottom[1], _segmentation(a["true_masks"][i], true_colors), "ground-truth masks")
        for k in range(K):
            im = _show(bottom[2 + k], logits[k], f"logits {k}", border=colors[k], cmap="viridis",
                       vmin=lo, vmax=max(hi, lo + 1e-6))
        cb = fig.colorbar(im, ax=list(bottom[2:]), shrink=0.9, pad=0.01)
        cb.set_label("mask logit", fontsize=7)
        cb.ax.tick_params(labelsize=6)
        top[0].set_ylabel(f"image {a['image_index'][i]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, png)


# ---------------------------------------------------------------------------------------
# Latent traversal (Figures 30 to 32)
# ---------------------------------------------------------------------------------------


def traversal(run: Run | str | Path, out: str | Path, *, image: int | None = None,
              slot: int | None = None, value_range: tuple[float, float] = (-2.0, 2.0),
              num_values: int = 7, num_dims: int = TRAVERSAL_DIMS, seed: int = 0,
              data: str | Path | None = None, num_iters: int | None = None,
              device: str = "cpu") -> FigureFiles:
    """Each latent dimension of one slot swept over a range, the scene re-rendered.

    Mirrors the paper's Figures 30 to 32 (and Figure 6, right). The posterior means of the
    final refinement step are kept for every slot but one dimension d of slot ``slot``,
    which takes the values mean_d + v * prior_sd for ``num_values`` offsets v evenly spaced
    over ``value_range``; all slots are decoded and mixed (sum_k pi_k mu_k) into a whole
    scene. Rows are the `num_dims` latent dimensions with the most KL(q || p) (the most
    informative; all of them when `num_dims` is at least n_z), in that order, columns the
    offsets. The left column shows the input, its
    reconstruction at the posterior mean and the chosen slot's mask.

    ``image`` and ``slot`` default to a random choice drawn from ``seed``.
    """
    png = _png_path(out)
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"--range must be finite, got {lo:g} {hi:g}")
    if not lo < hi:
        raise ValueError(f"--range must go from low to high, got {lo:g} {hi:g}")
    if num_values < 2:
        raise ValueError(f"--num-values must be at least 2, got {num_values}")
    if num_dims < 1:
        raise ValueError(f"--dims must be at least 1, got {num_dims}")
    run = _open(run, data, device, "traversal")
    system, cfg = run.system, run.cfg
    n_images, K, n_z = run.ds.sizes["image"], cfg.model.num_slots, cfg.model.latent_dim
    rng = np.random.default_rng(seed)
    pick_image, pick_slot = int(rng.integers(n_images)), int(rng.integers(K))
    image = pick_image if image is None else image
    slot = pick_slot if slot is None else slot
    if not 0 <= image < n_images:
        raise ValueError(f"--image {image} is out of range: {run.data} has {n_images} images (0 to {n_images - 1})")
    if not 0 <= slot < K:
        raise ValueError(f"--slot {slot} is out of range: the run has {K} slots (0 to {K - 1})")
    x = load_images(run.ds, image, image + 1)["image"].to(device)   # x: [1, C, H, W]
    _seed(seed)
    with torch.no_grad():
        last = system.infer(x, num_iters=num_iters)[-1]
        mean = last.lam[0, :, :n_z]                                  # mean: [K, n_z]
        kl = kl_divergence(system.guide.posterior(last.lam),
                           system.model.prior(1, K, like=x))[0, slot]  # kl: [n_z]
        D = min(num_dims, n_z)
        dims = torch.argsort(kl, descending=True, stable=True)[:D]   # dims: [D]
        sd = cfg.model.prior_var ** 0.5
        offsets = torch.tensor(np.linspace(lo, hi, num_values).round(9), dtype=x.dtype,
                           device=x.device)                          # offsets: [V]
        values = mean[slot, dims, None] + sd * offsets               # values: [D, V]
        z = mean.expand(D, num_values, K, n_z).clone()               # z: [D, V, K, n_z]
        rows = torch.arange(D, device=x.device)
        z[rows, :, slot, dims] = values
        renders = _render(system, z.reshape(D * num_values, K, n_z))   # [D * V, C, H, W]
        recon, masks = _render(system, mean[None], with_masks=True)     # [1, C, H, W], [1, K, H, W]
    arrays = {
        "image": _np(x[0]),                                          # [C, H, W]
        "image_index": np.array(image), "slot": np.array(slot),
        "posterior_mean": _np(mean),                                 # [K, n_z]
        "kl": _np(kl),                                               # [n_z]
        "dims": dims.cpu().numpy(),                                  # [D]
        "offsets": _np(offsets),                                     # [V]
        "values": _np(values),                                       # [D, V]
        "renders": _np(renders).reshape(D, num_values, *x.shape[1:]),    # [D, V, C, H, W]
        "recon": _np(recon[0]),                                      # [C, H, W]
        "slot_mask": _np(masks[0, slot]),                            # [H, W]
    }
    data_path = _data_path(png, ".npz")
    stage_npz(data_path, arrays, companion=png)
    shown = f"the {D} of {n_z} latent dimensions with most KL" if D < n_z else f"all {n_z} latent dimensions"
    draw_traversal(arrays, png, K, title=f"Latent traversal of slot {slot} in image {image}, {shown}: "
                                         f"{run.title()}")
    return FigureFiles(png, data_path)


def _render(system: Iodine, z: torch.Tensor, with_masks: bool = False):
    """Decode z [B, K, n_z] into scenes [B, C, H, W] (and masks [B, K, H, W])."""
    decoded = system.model.decode(z)
    masks = decoded.masks                                            # [B, K, H, W]
    scene = decoded.reconstruction(masks)                            # [B, C, H, W]
    return (scene, masks) if with_masks else scene


def draw_traversal(a: dict[str, np.ndarray], png: Path, num_slots: int, title: str) -> None:
    """Draw the arrays of `traversal`: rows latent dims, columns offsets."""
    D, V = a["renders"].shape[:2]
    color = slot_colors(num_slots)[int(a["slot"])]
    fig, axes = plt.subplots(D, V + 1, figsize=(1.05 * (V + 1) + 0.6, 1.0 * D + 1.0), squeeze=False,
                             layout="constrained")
    for ax in axes[:, 0]:
        ax.axis("off")
    context = [(_rgb(a["image"]), "input", None), (_rgb(a["recon"]), "reconstruction", None),
               (_over_white(a["image"], a["slot_mask"]), f"slot {int(a['slot'])} mask", color)]
    for ax, (picture, name, border) in zip(axes[:, 0], context):
        ax.axis("on")
        _show(ax, picture, name, border=border)
    for r in range(D):
        d = int(a["dims"][r])
        for c in range(V):
            ax = axes[r, 1 + c]
            _show(ax, _rgb(a["renders"][r, c]), f"{a['offsets'][c] + 0.0:+.2f} sd" if r == 0 else None)
        axes[r, 1].set_ylabel(f"dim {d}\nKL {a['kl'][d]:.2f}", fontsize=7)
    fig.suptitle(f"{title}\nrows: latent dimensions by KL; columns: offset from the posterior mean "
                 f"in prior standard deviations", fontsize=9)
    _save(fig, png)


# ---------------------------------------------------------------------------------------
# Projections of object latents (Figures 24 to 29)
# ---------------------------------------------------------------------------------------


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
    # scikit-learn and SciPy for this figure only: importing them with the toolkit would add a
    # second to every command that draws (fit's pictures among them)
    from scipy.optimize import linear_sum_assignment
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    png = _png_path(out)
    if num_images < 1 or batch_size < 1:
        raise ValueError("--num-images and the batch size must be at least 1")
    run = _open(run, data, device, "projection")
    n_z = run.cfg.model.latent_dim
    n = min(num_images, run.ds.sizes["image"])
    factors = [k for k in run.ds.data_vars if k not in ("image", "mask", "visibility")]
    if not factors:
        raise DatasetError(f"{run.data} has no per-object factors to colour the projection by")
    visibility = run.ds["visibility"][:n].values if "visibility" in run.ds else None  # [n, G]
    _seed(seed)
    rows: dict[str, list] = {"latent": [], "image_index": [], "group": [], "slot": [], "iou": []}
    for start in range(0, n, batch_size):
        batch = load_images(run.ds, start, min(start + batch_size, n))
        true = batch["mask"].to(device)                               # true: [B, G, H, W]
        last = run.system.infer(batch["image"].to(device), num_iters=num_iters)[-1]
        inter = torch.einsum("bghw,bkhw->bgk", true, last.masks)      # [B, G, K]
        union = true.sum((2, 3))[:, :, None] + last.masks.sum((2, 3))[:, None] - inter
        iou = _np(inter / union.clamp_min(1e-9))                      # [B, G, K]
        present = _np(true.sum((2, 3))) > 0                           # [B, G]
        for b in range(true.shape[0]):
            i = start + b
            groups = [g for g in range(1, true.shape[1])
                      if present[b, g] and (visibility is None or visibility[i, g] > 0)]
            if not groups:
                continue
            gi, ks = linear_sum_assignment(-iou[b, groups])
            for g_idx, k in zip(gi, ks):
                g = groups[g_idx]
                rows["latent"].append(_np(last.lam[b, k, :n_z]))
                rows["image_index"].append(i)
                rows["group"].append(g)
                rows["slot"].append(int(k))
                rows["iou"].append(float(iou[b, g, k]))
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
    data_path = _data_path(png, ".npz")
    stage_npz(data_path, arrays, companion=png)
    spec = DATASETS.get(str(run.ds.attrs.get("dataset", "")))
    draw_projection(arrays, factors, png,
                    title=f"Object latents of {M} objects in {n} images, {_final(run.system)}: "
                          f"{run.title()}", categorical=spec.categorical if spec else CATEGORICAL)
    return FigureFiles(png, data_path)


def _rgb_factor(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """[M, 3] colours (0..1 or 0..255) -> dot colours [M, 3] and a name per object."""
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
    _save(fig, png)


# ---------------------------------------------------------------------------------------
# Training curves and input ablations (Figures 33 to 40)
# ---------------------------------------------------------------------------------------


def _metrics_of(run_dir: str | Path) -> list[dict[str, Any]]:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"no {METRICS} in {run_dir}, or no metrics logged in it yet")
    return rows


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in run_dirs]


def _smoothed(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` logged points (NaN-aware)."""
    if window <= 1:
        return y
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        chunk = y[max(0, i - window + 1):i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def _json_number(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def curves(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
           smooth: int = 1, title: str | None = None, highlight: str | None = None) -> FigureFiles:
    """Training curves of one or several runs overlaid: total loss, MSE, KL and FG-ARI
    against training steps, read from each run's metrics.jsonl (one panel per metric, one
    line per run, a legend when there are several). ``smooth`` > 1 draws a trailing moving
    average over that many logged points."""
    png = _png_path(out)
    if not run_dirs:
        raise ValueError("plot curves needs at least one run directory")
    if smooth < 1:
        raise ValueError(f"--smooth must be at least 1, got {smooth}")
    run_dirs = [Path(r) for r in run_dirs]
    labels = list(labels) if labels is not None else _labels(run_dirs)
    runs = []
    for label, run_dir in zip(labels, run_dirs):
        rows = _metrics_of(run_dir)
        entry: dict[str, Any] = {"label": label, "run_dir": str(run_dir),
                                 "step": [int(r["step"]) for r in rows]}
        for key in CURVE_KEYS:
            entry[key] = [_json_number(r.get(key)) for r in rows]
        runs.append(entry)
    keys = [k for k in CURVE_KEYS if any(v is not None for run in runs for v in run[k])]
    data_path = _data_path(png, ".json")
    stage_text(data_path, json.dumps({"keys": keys, "smooth": smooth, "runs": runs}, indent=1) + "\n", companion=png)
    if title is None:
        title = "Training curves" + (f" of {labels[0]}" if len(runs) == 1 else f" of {len(runs)} runs")
    if smooth > 1:
        title += f"\n(moving average over {smooth} logged points)"
    draw_curves(runs, keys, png, title=title, smooth=smooth, highlight=highlight)
    return FigureFiles(png, data_path)


FEW_POINTS = 5     # curves of fewer logged points are drawn as points only


def _spans_decades(runs: list[dict[str, Any]], key: str) -> bool:
    """Whether `key` is positive throughout and spans more than a factor of 20 (log axis)."""
    values = np.array([v for run in runs for v in run[key] if v is not None], float)
    return values.size > 0 and values.min() > 0 and values.max() / values.min() > 20


def draw_curves(runs: list[dict[str, Any]], keys: Sequence[str], png: Path, title: str,
                smooth: int = 1, highlight: str | None = None) -> None:
    """Panels of `keys` against step, one line per run (``highlight`` drawn black and thick)."""
    cols = 2 if len(keys) > 1 else 1
    rows = math.ceil(len(keys) / cols)
    many = len(runs) > 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + (2.2 if many else 0), 3.0 * rows + 0.5),
                             squeeze=False, layout="constrained")
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        color_index = 0
        for run in runs:
            y = _smoothed(np.array([np.nan if v is None else v for v in run[key]], float), smooth)
            if run["label"] == highlight:
                style = {"color": "black", "linewidth": 2.2, "zorder": 3}
            else:
                style = {"color": palette(color_index % palette.N), "linewidth": 1.2}
                color_index += 1
            if len(y) < FEW_POINTS:  # a line through two or three points suggests a trend they cannot show
                style.update(marker="o", markersize=5, linestyle="none")
            elif len(y) <= 30:       # few logged points: mark them
                style.update(marker="o", markersize=3)
            ax.plot(run["step"], y, label=run["label"], **style)
        name, ylabel = CURVE_LABELS[key]
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "loss" and _spans_decades(runs, key):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if many:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8, title="run", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, png)


def ablation_runs(ablation_dir: str | Path) -> list[Path]:
    """The run directories of an ablation (``full`` first, then ``no-*`` by name)."""
    root = Path(ablation_dir)
    found = sorted(p for p in root.iterdir() if (p / METRICS).is_file()) if root.is_dir() else []
    if not found:
        raise ValueError(f"no ablation runs (*/{METRICS}) in {root}")
    return sorted(found, key=lambda p: (p.name != "full", p.name))


def ablation(ablation_dir: str | Path, out: str | Path, *, smooth: int = 1) -> FigureFiles:
    """Input ablations: total loss, MSE, KL and FG-ARI against training steps, one line per
    run of `iodine_pyro.ablate.ablate` (``full`` in black, ``no-<input>`` the model trained
    without that refinement input). Mirrors the paper's Figures 33 to 40 in one figure."""
    runs = ablation_runs(ablation_dir)
    return curves(runs, out, labels=[p.name for p in runs], smooth=smooth, highlight="full",
                  title=f"Refinement input ablations ({Path(ablation_dir).resolve().name}): "
                        f"the full model and one refinement input left out per run")


# ---------------------------------------------------------------------------------------
# Learning speed (benchmarks/learning_speed.py)
# ---------------------------------------------------------------------------------------


def draw_learning_speed(curves: dict[str, dict[str, list[list[float]]]], keys: Sequence[str],
                        png: str | Path, title: str = "Held-out metrics against training CPU time") -> FigureFiles:
    """Panels of held-out `keys` against CPU minutes, one colour per variant: each seed a
    thin line, their mean a thick one (``fast`` black, ``paper`` grey).

    Args:
        curves: {variant: {seed: [[cpu_min, step, *values of keys], ...]}}.
    """
    png = _png_path(png)
    data = _data_path(png, ".json")
    stage_text(data, json.dumps({"keys": list(keys), "columns": ["cpu_min", "step", *keys], "curves": curves}),
               companion=png)
    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 2.6, 3.0 * rows + 0.5), squeeze=False,
                             layout="constrained")
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    fixed = {"fast": "black", "paper": "0.55"}
    others = iter(range(100))
    colors = {v: fixed.get(v) or palette(next(others) % palette.N) for v in curves}
    for ax, (j, key) in zip(axes.flat, enumerate(keys)):
        for v, seeds in curves.items():
            series = [np.array(points, float) for points in seeds.values()]
            for a in series:
                ax.plot(a[:, 0], a[:, 2 + j], color=colors[v], linewidth=0.7, alpha=0.45)
            n = min(len(a) for a in series)
            mean = np.mean([a[:n] for a in series], 0)
            ax.plot(mean[:, 0], mean[:, 2 + j], color=colors[v], linewidth=2.4 if v in fixed else 1.6,
                    marker="o", markersize=3, label=v)
        name, ylabel = CURVE_LABELS[key]
        ax.set_title(f"held-out {name}", fontsize=10)
        ax.set_xlabel("training CPU minutes (one thread)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if key in ("mse", "kl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title="variant", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, png)
    return FigureFiles(png, data)


# ---------------------------------------------------------------------------------------
# Stored datasets (data show: Figures 13 to 15)
# ---------------------------------------------------------------------------------------


def dataset_grid(ds, out: str | Path, *, num_images: int = 8, start: int = 0, frame: int = 0,
                 background: int = 1, title: str | None = None) -> Path:
    """Images beside their ground-truth masks (as the paper's Figures 13 to 15): one row per
    image; columns: the image, then every mask group white on black (the `background`
    groups first). Pixels in no group (e.g. Shapes' overlaps) are black in every mask column.

    Args:
        ds: an opened store (`iodine_pyro.data.open_dataset`).
        out: the PNG file to write.
        num_images: rows (at most the dataset's images from ``start``).
        start: the first image; frame: the frame shown of a sequence dataset.
    """
    n_all = ds.sizes["image"]
    if not 0 <= start < n_all:
        raise ValueError(f"--start {start} is outside the {n_all} images")
    stop = min(start + num_images, n_all)
    image = ds["image"][start:stop].values  # [n, H, W, C] or [n, T, H, W, C] uint8
    mask = ds["mask"][start:stop].values  # [n, G, H, W] or [n, T, G, H, W] uint8
    sequence = is_sequence(ds)
    if sequence:
        if not 0 <= frame < ds.sizes["frame"]:
            raise ValueError(f"--frame {frame} is outside the {ds.sizes['frame']} frames")
        image, mask = image[:, frame], mask[:, frame]  # [n, H, W, C], [n, G, H, W]
    if (mask > 1).any():
        raise DatasetError(f"{ds.encoding.get('source', 'dataset')}: mask values are not 0/1")
    n, G = mask.shape[:2]
    fig, axes = plt.subplots(n, G + 1, figsize=(1.3 * (G + 1), 1.3 * n + 0.5), squeeze=False,
                             layout="constrained")
    for i in range(n):
        picture = image[i, ..., 0] if image.shape[-1] == 1 else image[i]  # [H, W] or [H, W, 3]
        _show(axes[i, 0], picture, cmap="gray", vmin=0, vmax=255)
        for g in range(G):
            _show(axes[i, g + 1], mask[i, g], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(str(start + i), fontsize=7)
    for column in range(G + 1):
        g = column - 1  # mask group of the column
        label = "image" if column == 0 else (
            ("background" if background == 1 else f"background {g}") if g < background else f"group {g}")
        axes[0, column].set_title(label, fontsize=7)
    frame_note = f", frame {frame}" if sequence else ""
    fig.suptitle(title or f"{ds.attrs.get('dataset', 'dataset')}: images {start} to {stop - 1}{frame_note} "
                          f"and ground-truth masks", fontsize=8)
    return save_figure(fig, out)


# ---------------------------------------------------------------------------------------
# Guide comparison (compare)
# ---------------------------------------------------------------------------------------


def draw_comparison(result: dict[str, Any], png: str | Path) -> Path:
    """ELBO, FG-ARI and MSE of `iodine_pyro.compare.compare` against the refinement step:
    guides that refine as lines with their trained T marked (dotted), one-shot guides as
    dashed horizontal lines, and each run's optimised per-image ELBO as a faint horizontal
    line in the ELBO panel."""
    runs = result["runs"]
    colors = slot_colors(max(len(runs), 1))
    longest = max(r["steps"] for r in runs.values())
    panels = [("elbo", "ELBO (nats / image)"), ("fg_ari", "FG-ARI"), ("mse", "MSE")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False,
                             layout="constrained")
    for ax, (key, label) in zip(axes[0], panels):
        for c, (name, r) in zip(colors, runs.items()):
            values = r[key]
            if r["steps"] > 1:
                ax.plot(range(1, r["steps"] + 1), values, "o-", color=c, ms=3, label=name)
                ax.axvline(r["trained_step"], color=c, ls=":", lw=1)
            else:
                ax.axhline(values[0], color=c, ls="--", label=f"{name} ({r['guide']})")
            if key == "elbo" and r["optimized_elbo"] is not None and not math.isnan(r["optimized_elbo"]):
                ax.axhline(r["optimized_elbo"], color=c, ls="-", lw=0.8, alpha=0.4)
        ax.set_xlim(0.5, max(longest, 1) + 0.5)
        ax.set_xlabel("refinement step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['settings']['num_images']} images; dotted: trained T; faint: optimised ELBO",
                 fontsize=8)
    return save_figure(fig, png)

