"""Latent traversals (Figures 30 to 32): one slot's latent dimensions swept, the scene
re-rendered. `traversal_arrays` computes (torch, no matplotlib), `draw_traversal` draws,
`traversal` writes both (`write_figure`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.distributions import kl_divergence

from .. import figures  # the package: functions are called through it, so a patched one is the one called
from ..data import load_images
from ..run import Run
from ..system import Iodine
from .files import FigureFiles, png_path
from .inputs import Opened, open_run, set_seed, to_numpy

TRAVERSAL_DIMS = 8          # latent dimensions a traversal shows by default: those with most KL


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
    png = png_path(out)
    _check_sweep(value_range, num_values, num_dims)     # before the run is read: a usage error at once
    run = open_run(run, data, device, "traversal")
    arrays = figures.traversal_arrays(run, image=image, slot=slot, value_range=value_range,
                                      num_values=num_values, num_dims=num_dims, seed=seed,
                                      num_iters=num_iters, device=device)
    D, n_z = len(arrays["dims"]), len(arrays["kl"])
    shown = f"the {D} of {n_z} latent dimensions with most KL" if D < n_z else f"all {n_z} latent dimensions"
    K = run.cfg.model.num_slots
    title = (f"Latent traversal of slot {int(arrays['slot'])} in image {int(arrays['image_index'])}, "
             f"{shown}: {run.title()}")
    return figures.write_figure(arrays, png,
                                lambda path: figures.draw_traversal(arrays, path, K, title=title))


def _check_sweep(value_range: tuple[float, float], num_values: int, num_dims: int) -> tuple[float, float]:
    """The range's ends, once the sweep's settings are checked."""
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"--range must be finite, got {lo:g} {hi:g}")
    if not lo < hi:
        raise ValueError(f"--range must go from low to high, got {lo:g} {hi:g}")
    if num_values < 2:
        raise ValueError(f"--num-values must be at least 2, got {num_values}")
    if num_dims < 1:
        raise ValueError(f"--dims must be at least 1, got {num_dims}")
    return lo, hi


def traversal_arrays(run: Opened | Run | str | Path, *, image: int | None = None, slot: int | None = None,
                     value_range: tuple[float, float] = (-2.0, 2.0), num_values: int = 7,
                     num_dims: int = TRAVERSAL_DIMS, seed: int = 0, data: str | Path | None = None,
                     num_iters: int | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    """The arrays of `traversal` (its data file), computed without drawing. The image and
    slot left as None are drawn from ``seed`` (both drawn, so that choosing one does not
    change the other)."""
    lo, hi = _check_sweep(value_range, num_values, num_dims)
    run = open_run(run, data, device, "traversal")
    n_images, K = run.ds.sizes["image"], run.cfg.model.num_slots
    rng = np.random.default_rng(seed)
    pick_image, pick_slot = int(rng.integers(n_images)), int(rng.integers(K))
    image = pick_image if image is None else image
    slot = pick_slot if slot is None else slot
    if not 0 <= image < n_images:
        raise ValueError(f"--image {image} is out of range: {run.data} has {n_images} images (0 to {n_images - 1})")
    if not 0 <= slot < K:
        raise ValueError(f"--slot {slot} is out of range: the run has {K} slots (0 to {K - 1})")
    x = load_images(run.ds, image, image + 1)["image"].to(device)   # x: [1, C, H, W]
    set_seed(seed)
    offsets = np.linspace(lo, hi, num_values).round(9)             # offsets: [V]
    return {"image": to_numpy(x[0]),                                 # [C, H, W]
            "image_index": np.array(image), "slot": np.array(slot),
            **_sweep(run, x, slot, offsets, num_dims, num_iters)}


def _sweep(run: Opened, x: torch.Tensor, slot: int, offsets: np.ndarray, num_dims: int,
           num_iters: int | None) -> dict[str, np.ndarray]:
    """Infer x [1, C, H, W], then render the scene with each of the `num_dims` dimensions of
    `slot` with most KL moved by `offsets` [V] prior standard deviations from its posterior
    mean (the rest of the data file's arrays)."""
    system, cfg = run.system, run.cfg
    K, n_z, V = cfg.model.num_slots, cfg.model.latent_dim, len(offsets)
    with torch.no_grad():
        last = system.infer(x, num_iters=num_iters)[-1]
        mean = last.lam[0, :, :n_z]                                  # mean: [K, n_z]
        kl = kl_divergence(system.guide.posterior(last.lam),
                           system.model.prior(1, K, like=x))[0, slot]  # kl: [n_z]
        D = min(num_dims, n_z)
        dims = torch.argsort(kl, descending=True, stable=True)[:D]   # dims: [D]
        sd = cfg.model.prior_var ** 0.5
        offsets = torch.tensor(offsets, dtype=x.dtype, device=x.device)   # offsets: [V]
        values = mean[slot, dims, None] + sd * offsets               # values: [D, V]
        z = mean.expand(D, V, K, n_z).clone()                        # z: [D, V, K, n_z]
        rows = torch.arange(D, device=x.device)
        z[rows, :, slot, dims] = values
        renders = _render(system, z.reshape(D * V, K, n_z))          # [D * V, C, H, W]
        recon, masks = _render(system, mean[None], with_masks=True)  # [1, C, H, W], [1, K, H, W]
    return {
        "posterior_mean": to_numpy(mean),                            # [K, n_z]
        "kl": to_numpy(kl),                                          # [n_z]
        "dims": dims.cpu().numpy(),                                  # [D]
        "offsets": to_numpy(offsets),                                # [V]
        "values": to_numpy(values),                                  # [D, V]
        "renders": to_numpy(renders).reshape(D, V, *x.shape[1:]),    # [D, V, C, H, W]
        "recon": to_numpy(recon[0]),                                 # [C, H, W]
        "slot_mask": to_numpy(masks[0, slot]),                       # [H, W]
    }


def _render(system: Iodine, z: torch.Tensor, with_masks: bool = False):
    """Decode z [B, K, n_z] into scenes [B, C, H, W] (and masks [B, K, H, W])."""
    decoded = system.model.decode(z)
    masks = decoded.masks                                            # [B, K, H, W]
    scene = decoded.reconstruction(masks)                            # [B, C, H, W]
    return (scene, masks) if with_masks else scene


def draw_traversal(a: dict[str, np.ndarray], png: Path, num_slots: int, title: str) -> None:
    """Draw the arrays of `traversal`: rows latent dims, columns offsets."""
    from .drawing import over_white, plt, rgb, show

    D, V = a["renders"].shape[:2]
    color = figures.slot_colors(num_slots)[int(a["slot"])]
    fig, axes = plt.subplots(D, V + 1, figsize=(1.05 * (V + 1) + 0.6, 1.0 * D + 1.0), squeeze=False,
                             layout="constrained")
    for ax in axes[:, 0]:
        ax.axis("off")
    context = [(rgb(a["image"]), "input", None), (rgb(a["recon"]), "reconstruction", None),
               (over_white(a["image"], a["slot_mask"]), f"slot {int(a['slot'])} mask", color)]
    for ax, (picture, name, border) in zip(axes[:, 0], context):
        ax.axis("on")
        show(ax, picture, name, border=border)
    for r in range(D):
        d = int(a["dims"][r])
        for c in range(V):
            ax = axes[r, 1 + c]
            show(ax, rgb(a["renders"][r, c]), f"{a['offsets'][c] + 0.0:+.2f} sd" if r == 0 else None)
        axes[r, 1].set_ylabel(f"dim {d}\nKL {a['kl'][d]:.2f}", fontsize=7)
    fig.suptitle(f"{title}\nrows: latent dimensions by KL; columns: offset from the posterior mean "
                 f"in prior standard deviations", fontsize=9)
    figures.save_figure(fig, png)
