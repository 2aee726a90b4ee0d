"""Decompositions of images into slots: `decomposition` (Figures 16 to 19), `sequence`
(Figure 12) and `mask_logits` (Figures 20 to 22).

Each figure is three functions: ``*_arrays`` runs the model and returns the arrays of the
data file (torch, no matplotlib), ``draw_*`` draws those arrays (matplotlib, imported
inside it), and the figure's own function writes both (`write_figure`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import figures  # the package: functions are called through it, so a patched one is the one called
from ..data import is_sequence, load_images
from ..run import Run
from .files import FigureFiles, png_path
from .inputs import Opened, final, first_images, open_run, set_seed, to_numpy

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
    png = png_path(out)
    run = open_run(run, data, device, "decomposition")
    arrays = figures.decomposition_arrays(run, num_images=num_images, all_steps=all_steps, seed=seed,
                                          num_iters=num_iters, device=device)
    last = int(arrays["step"][-1])                                # the steps run: the last one shown
    which = "every refinement step" if all_steps else final(run.system, last)
    if is_sequence(run.ds):
        which += f", frame {last} of each sequence"
    title = f"Decomposition, {which}: {run.title()}"
    return figures.write_figure(arrays, png,
                                lambda path: figures.draw_decomposition(arrays, path, title=title))


def decomposition_arrays(run: Opened | Run | str | Path, *, num_images: int = 4, all_steps: bool = False,
                         seed: int = 0, data: str | Path | None = None, num_iters: int | None = None,
                         device: str = "cpu") -> dict[str, np.ndarray]:
    """The arrays of `decomposition` (its data file), computed without drawing: the first
    ``num_images`` images inferred, every step kept with ``all_steps``, else the final one."""
    run = open_run(run, data, device, "decomposition")
    sequence = is_sequence(run.ds)
    if sequence and all_steps:
        raise ValueError("a sequence run's steps are its frames: draw them with plot sequence")
    x = first_images(run, num_images, device)["image"]            # x: [N, C, H, W] (or [N, F, C, H, W])
    set_seed(seed)
    steps = run.system.infer(x, num_iters=num_iters)
    shown = list(range(len(steps))) if all_steps else [len(steps) - 1]
    if sequence:                                                  # the final step reads frame F
        x = x[:, len(steps) - 1]                                  # x: [N, C, H, W]
    return {
        "image": to_numpy(x),                                                   # [N, C, H, W]
        "recon": to_numpy(torch.stack([steps[t].recon for t in shown], 1)),     # [N, S, C, H, W]
        "masks": to_numpy(torch.stack([steps[t].masks for t in shown], 1)),     # [N, S, K, H, W]
        "means": to_numpy(torch.stack([steps[t].means for t in shown], 1)),     # [N, S, K, C, H, W]
        "step": np.array(shown) + 1,                                            # [S]
        "image_index": np.arange(x.shape[0]),                                   # [N]
    }


def draw_decomposition(a: dict[str, np.ndarray], png: Path, title: str,
                       row_labels: Sequence[str] | None = None) -> None:
    """Draw the arrays of `decomposition` (one row per image and shown step; `row_labels`
    replace the images' "image i")."""
    from .drawing import over_white, plt, rgb, segmentation, show

    N, S, K = a["masks"].shape[:3]
    colors = figures.slot_colors(K)
    cols = 3 + K
    fig, axes = plt.subplots(N * S, cols, figsize=(1.5 * cols + 0.4, 1.55 * N * S + 0.6),
                             squeeze=False, layout="constrained")
    for i in range(N):
        for s in range(S):
            row = axes[i * S + s]
            top = i == 0 and s == 0
            masks, means = a["masks"][i, s], a["means"][i, s]              # [K, H, W], [K, C, H, W]
            show(row[0], rgb(a["image"][i]), "image" if top else None)
            show(row[1], rgb(a["recon"][i, s]), "reconstruction" if top else None)
            show(row[2], segmentation(masks, colors), "segmentation" if top else None)
            for k in range(K):
                show(row[3 + k], over_white(means[k], masks[k]), f"slot {k}" if top else None,
                     border=colors[k])
            label = row_labels[i] if row_labels is not None else f"image {a['image_index'][i]}"
            if S > 1:
                label += f"\nstep {a['step'][s]}"
            row[0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    figures.save_figure(fig, png)


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
    png = png_path(out)
    run = open_run(run, data, device, "sequence")
    arrays = figures.sequence_arrays(run, image=image, seed=seed, num_iters=num_iters, device=device)
    title = f"Sequence {image}, one refinement step per frame\n{run.title()}"
    return figures.write_figure(arrays, png, lambda path: figures.draw_sequence(arrays, path, title=title))


def sequence_arrays(run: Opened | Run | str | Path, *, image: int = 0, seed: int = 0,
                    data: str | Path | None = None, num_iters: int | None = None,
                    device: str = "cpu") -> dict[str, np.ndarray]:
    """The arrays of `sequence` (its data file), computed without drawing: sequence
    ``image`` inferred, one refinement step per frame."""
    run = open_run(run, data, device, "sequence")
    n = run.ds.sizes["image"]
    if not 0 <= image < n:
        raise ValueError(f"--image {image} is outside the {n} sequences of {run.data}")
    batch = {k: v.to(device) for k, v in load_images(run.ds, image, image + 1).items()}
    set_seed(seed)
    steps = run.system.infer(batch["image"], num_iters=num_iters)           # one step per frame
    F_ = len(steps)
    return {
        "image": to_numpy(batch["image"][0, :F_]),                             # [F, C, H, W]
        "recon": to_numpy(torch.stack([s.recon[0] for s in steps])),            # [F, C, H, W]
        "masks": to_numpy(torch.stack([s.masks[0] for s in steps])),            # [F, K, H, W]
        "true_masks": to_numpy(batch["mask"][0, :F_]),                          # [F, G, H, W]
        "frame": np.arange(F_) + 1,                                             # [F]
        "image_index": np.array(image),
    }


def draw_sequence(a: dict[str, np.ndarray], png: Path, title: str) -> None:
    """Draw the arrays of `sequence`: frames along columns, slots along rows."""
    from .drawing import plt, rgb, segmentation, show

    F_, K = a["masks"].shape[:2]
    colors = figures.slot_colors(K)
    true_colors = figures.slot_colors(a["true_masks"].shape[1])
    rows = 4 + K
    fig, axes = plt.subplots(rows, F_, figsize=(1.1 * F_ + 0.8, 1.15 * rows + 0.6), squeeze=False,
                             layout="constrained")
    labels = ["frame", "reconstruction", "segmentation", "true segmentation"] + [f"slot {k}" for k in range(K)]
    for t in range(F_):
        col = axes[:, t]
        show(col[0], rgb(a["image"][t]), f"t={a['frame'][t]}")
        show(col[1], rgb(a["recon"][t]))
        show(col[2], segmentation(a["masks"][t], colors))
        true = a["true_masks"][t]                                               # [G, H, W]
        show(col[3], np.where(true.any(0)[..., None], segmentation(true, true_colors), 1.0))
        for k in range(K):
            show(col[4 + k], a["masks"][t, k], border=colors[k], cmap="gray", vmin=0, vmax=1)
    for r, label in enumerate(labels):
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    figures.save_figure(fig, png)


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
    png = png_path(out)
    run = open_run(run, data, device, "mask-logits")
    arrays = figures.mask_logits_arrays(run, num_images=num_images, seed=seed, num_iters=num_iters,
                                        device=device)
    title = f"Masks and mask logits, {final(run.system)}: {run.title()}"
    return figures.write_figure(arrays, png, lambda path: figures.draw_mask_logits(arrays, path, title=title))


def mask_logits_arrays(run: Opened | Run | str | Path, *, num_images: int = 4, seed: int = 0,
                       data: str | Path | None = None, num_iters: int | None = None,
                       device: str = "cpu") -> dict[str, np.ndarray]:
    """The arrays of `mask_logits` (its data file), computed without drawing: the final
    step's masks and mask logits of the first ``num_images`` images, with their true masks."""
    run = open_run(run, data, device, "mask-logits")
    batch = first_images(run, num_images, device)
    x = batch["image"]                                               # x: [N, C, H, W]
    set_seed(seed)
    last = run.system.infer(x, num_iters=num_iters)[-1]
    return {
        "image": to_numpy(x),                                        # [N, C, H, W]
        "masks": to_numpy(last.masks),                               # [N, K, H, W]
        "mask_logits": to_numpy(last.mask_logits),                   # [N, K, H, W]
        "true_masks": to_numpy(batch["mask"]),                       # [N, G, H, W]
        "image_index": np.arange(x.shape[0]),                        # [N]
    }


def draw_mask_logits(a: dict[str, np.ndarray], png: Path, title: str) -> None:
    """Draw the arrays of `mask_logits` (two rows per image)."""
    from .drawing import over_white, plt, rgb, segmentation, show

    N, K = a["masks"].shape[:2]
    G = a["true_masks"].shape[1]
    colors, true_colors = figures.slot_colors(K), figures.slot_colors(G)
    cols = 2 + K
    fig, axes = plt.subplots(2 * N, cols, figsize=(1.5 * cols + 1.2, 3.0 * N + 0.6), squeeze=False,
                             layout="constrained")
    for i in range(N):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        image = a["image"][i]                                        # [C, H, W]
        show(top[0], rgb(image), "image")
        show(top[1], segmentation(a["masks"][i], colors), "predicted masks")
        for k in range(K):
            show(top[2 + k], over_white(image, a["masks"][i, k]), f"mask {k}", border=colors[k])
        logits = a["mask_logits"][i]                                 # [K, H, W]
        lo, hi = float(logits.min()), float(logits.max())
        show(bottom[0], rgb(image), "image")
        show(bottom[1], segmentation(a["true_masks"][i], true_colors), "ground-truth masks")
        for k in range(K):
            im = show(bottom[2 + k], logits[k], f"logits {k}", border=colors[k], cmap="viridis",
                      vmin=lo, vmax=max(hi, lo + 1e-6))
        cb = fig.colorbar(im, ax=list(bottom[2:]), shrink=0.9, pad=0.01)
        cb.set_label("mask logit", fontsize=7)
        cb.ax.tick_params(labelsize=6)
        top[0].set_ylabel(f"image {a['image_index'][i]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    figures.save_figure(fig, png)
