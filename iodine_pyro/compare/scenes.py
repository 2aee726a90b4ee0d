"""The comparison's images: the first run's held-out set, or scenes merged from several of
its images (`merge_scenes`) for the generalisation to more objects than training."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_images
from ..run import IMAGES, Run


def merge_scenes(images: torch.Tensor, masks: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes with more objects than training: each output scene is source image i*m with
    the objects of images i*m+1 .. i*m+m-1 pasted in. An object goes where it was if that
    spot is free, else to the nearest position (of its bounding box) where it overlaps no
    object already in the scene and lies wholly inside the image; an object with no free
    position is left out. Pasted objects may touch others, as Tetrominoes pieces do.

    Needs a uniform background (Tetrominoes: black), checked, so that pasting an object's
    pixels is the whole edit.

    Args:
        images: [N, C, H, W]; masks: [N, G, H, W] 0/1 with group 0 the background.
        merge: m >= 1 source images per scene.
    Returns:
        ([N // m, C, H, W], [N // m, 1 + (G - 1) m, H, W]); an object left out keeps an
        all-zero group, which the ARI ignores.
    """
    if merge < 1:
        raise ValueError(f"`merge` must be at least 1, got {merge}")
    if merge == 1:
        return images, masks
    N, G = images.shape[0] // merge, masks.shape[1]
    if N < 1:
        raise ValueError(f"merging {merge} images per scene needs at least {merge} images")
    bg = masks[:, 0] > 0                                                  # [N0, H, W]
    pixels = images.permute(0, 2, 3, 1)[bg]                               # [P, C]
    if pixels.numel() and float((pixels - pixels[0]).abs().max()) > 1e-6:
        raise ValueError("merging scenes needs a uniform background, and these images have none")
    out_x, out_m = images[::merge][:N].clone(), []
    for i in range(N):
        fg = masks[i * merge, 1:].sum(0) > 0                              # [H, W]
        groups = list(masks[i * merge].unbind(0))                         # G x [H, W]
        for j in range(1, merge):
            src = i * merge + j
            for g in range(1, G):
                placed = _place(out_x[i], fg, images[src], masks[src, g] > 0)
                groups.append(placed.to(masks.dtype))
                fg |= placed
        groups[0] = (~fg).to(masks.dtype)
        out_m.append(torch.stack(groups))                                 # [1 + (G-1) m, H, W]
    return out_x, torch.stack(out_m)


def _place(scene: torch.Tensor, fg: torch.Tensor, source: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """Paste `source`'s object `obj` [H, W] into `scene` [C, H, W] (in place) at the free
    position nearest its own; returns its mask in the scene (all False if left out)."""
    placed = torch.zeros_like(fg)
    if not obj.any():
        return placed
    rows, cols = obj.any(1).nonzero()[:, 0], obj.any(0).nonzero()[:, 0]
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    patch = obj[r0:r1, c0:c1]                                             # [h, w]
    overlap = F.conv2d(fg[None, None].float(), patch[None, None].float())[0, 0]   # [H-h+1, W-w+1]
    free = (overlap == 0).nonzero()                                       # [P, 2] top-left corners
    if free.numel() == 0:
        return placed
    r, c = free[((free - torch.tensor([r0, c0])) ** 2).sum(1).argmin()].tolist()
    h, w = patch.shape
    placed[r:r + h, c:c + w] = patch
    scene[:, placed] = source[:, r0:r1, c0:c1][:, patch]
    return placed


def load_images_for(run: Run, data: str | Path | Mapping[str, torch.Tensor] | None,
                    num_images: int, merge: int = 1) -> tuple[dict[str, torch.Tensor], str, int]:
    """The images of a comparison: ``image`` [N, C, H, W], ``mask`` [N, G, H, W] (if known),
    where they come from, and how many leading mask groups are background.

    `data` is a stored dataset, an in-memory dict with ``image`` (and ``mask``), or None for
    the run's held-out set; with `merge` > 1 the scenes are merged (`merge_scenes`).
    """
    if isinstance(data, Mapping):
        batch = {k: v[:num_images * merge] for k, v in data.items() if k in ("image", "mask")}
        where, background = "in-memory images", 1
    else:
        ds, where = run.dataset(data, need=IMAGES, command="compare")
        batch = load_images(ds, 0, min(num_images * merge, ds.sizes["image"]))
        background = run.background_groups(ds)
    if merge > 1:
        if "mask" not in batch:
            raise ValueError("merging scenes needs ground-truth masks")
        batch["image"], batch["mask"] = merge_scenes(batch["image"], batch["mask"], merge)
    return batch, where, background
