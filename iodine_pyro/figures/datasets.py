"""Stored datasets (``data show``: Figures 13 to 15): `dataset_grid_arrays` reads images and
their ground-truth masks (no matplotlib), `dataset_grid` draws them into a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import figures  # the package: functions are called through it, so a patched one is the one called
from ..data import DatasetError, is_sequence


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
    a = figures.dataset_grid_arrays(ds, num_images=num_images, start=start, frame=frame)
    stop = start + len(a["image"])
    frame_note = f", frame {frame}" if is_sequence(ds) else ""
    title = title or (f"{ds.attrs.get('dataset', 'dataset')}: images {start} to {stop - 1}{frame_note} "
                      f"and ground-truth masks")
    return _draw_dataset_grid(a, out, start, background, title)


def dataset_grid_arrays(ds, *, num_images: int = 8, start: int = 0, frame: int = 0) -> dict[str, np.ndarray]:
    """The pictures of `dataset_grid`, read without drawing: ``image`` [n, H, W, C] and
    ``mask`` [n, G, H, W] (uint8, a sequence's ``frame``), checked to be 0/1 masks."""
    n_all = ds.sizes["image"]
    if not 0 <= start < n_all:
        raise ValueError(f"--start {start} is outside the {n_all} images")
    stop = min(start + num_images, n_all)
    image = ds["image"][start:stop].values  # [n, H, W, C] or [n, T, H, W, C] uint8
    mask = ds["mask"][start:stop].values  # [n, G, H, W] or [n, T, G, H, W] uint8
    if is_sequence(ds):
        if not 0 <= frame < ds.sizes["frame"]:
            raise ValueError(f"--frame {frame} is outside the {ds.sizes['frame']} frames")
        image, mask = image[:, frame], mask[:, frame]  # [n, H, W, C], [n, G, H, W]
    if (mask > 1).any():
        raise DatasetError(f"{ds.encoding.get('source', 'dataset')}: mask values are not 0/1")
    return {"image": image, "mask": mask}


def _draw_dataset_grid(a: dict[str, np.ndarray], out: str | Path, start: int, background: int,
                       title: str) -> Path:
    """Draw the pictures of `dataset_grid_arrays` (rows labelled from image `start`) into `out`."""
    from .drawing import plt, show

    image, mask = a["image"], a["mask"]
    n, G = mask.shape[:2]
    fig, axes = plt.subplots(n, G + 1, figsize=(1.3 * (G + 1), 1.3 * n + 0.5), squeeze=False,
                             layout="constrained")
    for i in range(n):
        picture = image[i, ..., 0] if image.shape[-1] == 1 else image[i]  # [H, W] or [H, W, 3]
        show(axes[i, 0], picture, cmap="gray", vmin=0, vmax=255)
        for g in range(G):
            show(axes[i, g + 1], mask[i, g], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(str(start + i), fontsize=7)
    for column in range(G + 1):
        g = column - 1  # mask group of the column
        label = "image" if column == 0 else (
            ("background" if background == 1 else f"background {g}") if g < background else f"group {g}")
        axes[0, column].set_title(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    return figures.save_figure(fig, out)
