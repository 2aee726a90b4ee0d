"""The drawing side shared by the figures: matplotlib (the Agg backend: files, no window),
slot colours and the panels every figure is made of.

Only the drawing functions import this module, inside themselves, so that computing a
figure's arrays (and importing `iodine_pyro.figures`) loads no matplotlib.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plt", "slot_colors", "show", "rgb", "segmentation", "over_white"]


def slot_colors(num_slots: int) -> np.ndarray:
    """[K, 3] distinct colours, the same for a given K everywhere."""
    cmap = plt.get_cmap("tab10" if num_slots <= 10 else "tab20")
    return np.array([cmap(k % cmap.N)[:3] for k in range(num_slots)])


def rgb(a: np.ndarray) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, 3] for imshow."""
    a = np.clip(a, 0, 1).transpose(1, 2, 0)                     # [H, W, C]
    return np.repeat(a, 3, 2) if a.shape[2] == 1 else a


def segmentation(masks: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """masks [K, H, W] -> [H, W, 3], each pixel coloured by its argmax slot."""
    return colors[masks.argmax(0)]


def over_white(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """picture [C, H, W] shown where mask [H, W] is on, white elsewhere -> [H, W, 3]."""
    return rgb(mask[None] * picture + (1 - mask[None]))


def show(ax, picture, title: str | None = None, border=None, **kw):
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
