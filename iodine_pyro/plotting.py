"""Pictures of a trained model (matplotlib, Agg backend, deterministic)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .iodine import StepResult  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` to `path` (creating its folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def slot_colors(num_slots: int) -> np.ndarray:
    """[K, 3] distinct colours, the same for a given K everywhere."""
    cmap = plt.get_cmap("tab10" if num_slots <= 10 else "tab20")
    return np.array([cmap(k % cmap.N)[:3] for k in range(num_slots)])


def _img(t: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, 3] for imshow."""
    a = t.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    return np.repeat(a, 3, 2) if a.shape[2] == 1 else a


def segmentation_image(masks: torch.Tensor, colors: np.ndarray) -> np.ndarray:
    """masks [K, H, W] -> [H, W, 3] colouring each pixel by its argmax slot."""
    return colors[masks.argmax(0).cpu().numpy()]


def plot_decomposition(x: torch.Tensor, step: StepResult, path: str | Path,
                       num_images: int = 4, title: str | None = None) -> Path:
    """Image, reconstruction, segmentation and each slot's masked reconstruction, with the
    slot's border coloured as in the segmentation (the paper's Figures 16 to 19).

    Args:
        x: [B, C, H, W] images; step: the `StepResult` to show.
    """
    n = min(num_images, x.shape[0])
    K = step.masks.shape[1]
    colors = slot_colors(K)
    cols = 3 + K
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n + 0.4), squeeze=False)
    for i in range(n):
        panels = [("image", _img(x[i])), ("reconstruction", _img(step.recon[i])),
                  ("segmentation", segmentation_image(step.masks[i], colors))]
        for k in range(K):
            masked = step.masks[i, k].unsqueeze(0) * step.means[i, k] + (1 - step.masks[i, k].unsqueeze(0))
            panels.append((f"slot {k}", _img(masked)))
        for j, (name, picture) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j >= 3:
                for spine in ax.spines.values():
                    spine.set_edgecolor(colors[j - 3])
                    spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(records: list[dict], path: str | Path, title: str | None = None,
                keys: tuple[str, ...] = ("loss", "mse", "kl", "fg_ari")) -> Path:
    """Training curves of `records` (rows of metrics.jsonl) against steps."""
    keys = tuple(k for k in keys if any(k in r for r in records))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [r.get(k, np.nan) for r in records])
        ax.set_xlabel("step")
        ax.set_title(k.replace("_", "-").upper() if k != "loss" else "loss", fontsize=9)
        if k == "loss":
            ax.set_yscale("symlog")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
