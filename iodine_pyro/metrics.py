"""Segmentation and reconstruction metrics for IODINE.

Adjusted Rand Index (ARI)
-------------------------
The ARI compares two partitions of the same pixels, corrected for chance:
1 means identical partitions (up to relabelling), ~0 means no better than a
random assignment with the same cluster sizes, and it can be negative.

We follow the definition in DeepMind's ``multi_object_datasets``
(``segmentation_metrics.adjusted_rand_index``), which IODINE's paper uses:

* the predicted segmentation is the argmax over the K predicted masks (ties
  go to the first slot), turned into a one-hot vector per pixel;
* the ground-truth masks are used directly as one-hot group memberships; a
  pixel whose ground-truth vector is all zeros is ignored;
* from the contingency table ``n_ij`` (pixels in true group i and predicted
  segment j), its row sums ``a``, column sums ``b`` and total ``n``::

      E   = sum a(a-1) * sum b(b-1) / (n(n-1))
      ARI = (sum n_ij(n_ij-1) - E) / (0.5 [sum a(a-1) + sum b(b-1)] - E)

* FG-ARI ("foreground only") drops the background group(s) from the ground
  truth first, so background pixels are ignored.

Degenerate cases, exactly as the official code decides them:

* "both single cluster" -> 1.0: every pixel of the image, ignored ones included, has the
  same true group id and the same predicted slot, where a pixel's true id is the argmax of
  its (remaining) ground-truth vector, 0 for an all-zero vector. The official code makes
  this test over all pixels, so predictions on ignored pixels can decide it.
* otherwise, where the formula is 0/0 -> NaN: fewer than two scored pixels, both
  partitions of the scored pixels a single cluster (e.g. one foreground object, all of
  it in one slot, with the background predicted in another slot: FG-ARI is NaN there,
  as officially), or every scored pixel its own cluster on both sides.

  Average with :func:`summarize` (or another nan-aware mean): an image whose FG-ARI is
  undefined does not count. A single ground-truth object split over several predicted
  segments is not degenerate: the ARI is exactly 0 there (numerator 0, denominator > 0).

All computations are vectorised over the batch with one-hot contingency
tables (a batched matmul) in float64; results are float64 tensors of shape
[B] on the inputs' device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["FATES", "Fates", "ari", "mse", "object_fates", "owners", "region_shares", "slot_stability",
           "slots_owning", "summarize"]


def _num_dropped_groups(foreground_only: bool | int, n_groups: int) -> int:
    if isinstance(foreground_only, bool):
        n_drop = int(foreground_only)
    elif isinstance(foreground_only, int):
        n_drop = foreground_only
    else:
        raise TypeError(f"foreground_only must be a bool or an int, got {type(foreground_only).__name__}")
    if not 0 <= n_drop <= n_groups:
        raise ValueError(f"foreground_only={foreground_only} must drop between 0 and G={n_groups} groups")
    return n_drop


def first_argmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The index of the largest value along `dim`, ties to the first: what ``argmax`` gives,
    from ``max``, which finds it faster when `dim` is not the innermost (float32 [8, 4, 1225]
    over the 4 slots, one thread of a Xeon: 0.13 against 1.07 ms; the metrics of one
    training-log row call it 30 times)."""
    return x.max(dim).indices


def _pixels_held(true: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """float64 [..., G, K]: the pixels of each true group that each slot holds, a pixel going
    to the slot of its largest mask (ties to the first, as in :func:`ari`).

    Args:
        true: [..., G, N] float64 group memberships over the N pixels.
        pred_masks: [..., K, H, W] predicted masks (probabilities or one-hot, any dtype).
    """
    pred = pred_masks.flatten(-2)
    pred = pred if pred.is_floating_point() else pred.to(torch.float64)
    return true @ F.one_hot(first_argmax(pred, -2), pred.shape[-2]).to(torch.float64)   # owner: [..., N, K]


def ari(
    true_masks: torch.Tensor,
    pred_masks: torch.Tensor,
    foreground_only: bool | int = False,
) -> torch.Tensor:
    """Adjusted Rand Index per image, DeepMind ``multi_object_datasets`` style.

    Args:
        true_masks: [B, G, H, W] ground-truth group masks with values 0/1
            (any numeric or bool dtype); group 0 is the background. Pixels
            whose G values are all zero are ignored.
        pred_masks: [B, K, H, W] predicted masks (probabilities or one-hot,
            any dtype); each pixel is assigned to its argmax slot.
        foreground_only: ``False`` scores every labelled pixel (ARI); ``True``
            drops true group 0 (FG-ARI); an int ``n`` drops the first ``n``
            groups (e.g. 4 for Objects Room: sky, floor and two walls).

    Returns:
        float64 tensor [B]; NaN for degenerate images (see module docstring),
        so aggregate with :func:`summarize`.

    Raises:
        ValueError: if the inputs are not 4-D, their B, H, W differ, K == 0,
            or ``foreground_only`` drops more groups than there are.
    """
    if true_masks.dim() != 4 or pred_masks.dim() != 4:
        raise ValueError(
            f"ari expects 4-D [B, G, H, W] and [B, K, H, W] masks, got shapes "
            f"{tuple(true_masks.shape)} and {tuple(pred_masks.shape)}"
        )
    (B, G, H, W), (Bp, K, Hp, Wp) = true_masks.shape, pred_masks.shape
    if (B, H, W) != (Bp, Hp, Wp):
        raise ValueError(
            f"ari: batch and spatial sizes differ: true_masks {tuple(true_masks.shape)} "
            f"vs pred_masks {tuple(pred_masks.shape)}"
        )
    if K == 0:
        raise ValueError("ari: pred_masks has no slots (K == 0)")
    n_drop = _num_dropped_groups(foreground_only, G)
    if n_drop == G:                                               # no group left to score
        return torch.full((B,), float("nan"), dtype=torch.float64, device=true_masks.device)

    true = true_masks[:, n_drop:].flatten(2).to(torch.float64)  # true: [B, G', N]
    pred = pred_masks.flatten(2)  # pred: [B, K, N]
    if not pred.is_floating_point():
        pred = pred.to(torch.float64)  # argmax is not defined for bool
    pred_ids = first_argmax(pred, 1)  # pred_ids: [B, N]
    pred_oh = F.one_hot(pred_ids, K).to(torch.float64)  # pred_oh: [B, N, K]
    true_ids = first_argmax(true, 1)  # true_ids: [B, N]; 0 for all-zero (ignored) pixels, as officially

    nij = torch.bmm(true, pred_oh)  # nij: [B, G', K]
    a = nij.sum(dim=2)  # a: [B, G']
    b = nij.sum(dim=1)  # b: [B, K]
    n = a.sum(dim=1)  # n: [B]

    rindex = (nij * (nij - 1)).sum(dim=(1, 2))  # rindex: [B]
    aindex = (a * (a - 1)).sum(dim=1)  # aindex: [B]
    bindex = (b * (b - 1)).sum(dim=1)  # bindex: [B]
    n_pairs = n * (n - 1)  # n_pairs: [B]

    # The denominator vanishes exactly when both partitions of the scored pixels are a
    # single cluster (aindex == bindex == n_pairs) or all singletons (aindex == bindex
    # == 0, which includes n < 2). Detect these from exact integer quantities rather
    # than comparing a rounded float denominator to 0.
    single_scored = ((a > 0).sum(dim=1) == 1) & ((b > 0).sum(dim=1) == 1)  # single_scored: [B]
    degenerate = single_scored | ((aindex == 0) & (bindex == 0))  # degenerate: [B]
    # The official special case, over all pixels (ignored ones included).
    both_single = ((true_ids == true_ids[:, :1]).all(1)) & ((pred_ids == pred_ids[:, :1]).all(1))  # [B]

    safe_pairs = torch.where(n_pairs > 0, n_pairs, torch.ones_like(n_pairs))  # safe_pairs: [B]
    expected = aindex * bindex / safe_pairs  # expected: [B]
    denom = 0.5 * (aindex + bindex) - expected  # denom: [B]
    safe_denom = torch.where(degenerate, torch.ones_like(denom), denom)  # safe_denom: [B]
    value = (rindex - expected) / safe_denom  # value: [B]

    nan = torch.full_like(value, float("nan"))
    return torch.where(both_single, torch.ones_like(value), torch.where(degenerate, nan, value))


OWNING_SHARE = 0.01   # a slot owns a region when it is the argmax of at least this share of its pixels


def slots_owning(true_masks: torch.Tensor, pred_masks: torch.Tensor, background: int = 1,
                 region: str = "background", share: float = OWNING_SHARE) -> torch.Tensor:
    """How many slots own a region of each image: the background or the objects.

    A pixel belongs to the slot of its largest mask (ties to the first slot, as in
    :func:`ari`). A slot owns the region when it holds at least `share` of the region's
    pixels, so a few stray pixels do not count. FG-ARI ignores the background, so a model
    can score FG-ARI 0.93 with the background spread over every slot: ``region =
    "background"`` counts exactly that (1 when the background is one slot's, as in the
    paper's figures; K when every slot has a share).

    Args:
        true_masks: [B, G, H, W] 0/1 ground-truth masks; the first `background` groups
            are the background (Objects Room: 4), the rest objects.
        pred_masks: [B, K, H, W] predicted masks (probabilities or one-hot).
        background: leading groups that make the background.
        region: ``"background"`` or ``"objects"`` (every group after the background).
        share: the least share of the region's pixels a slot must hold, in [0, 1).
    Returns:
        float64 [B] (whole numbers); NaN for an image without pixels of that region.
    """
    return owners(region_shares(true_masks, pred_masks, background, region), share)


def owners(held: torch.Tensor, share: float = OWNING_SHARE) -> torch.Tensor:
    """:func:`slots_owning` from the shares :func:`region_shares` gives ([B, K]): the slots
    holding at least `share` (in [0, 1)) of the region, float64 [B]; NaN for NaN rows."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share must lie in [0, 1), got {share}")
    count = ((held > 0) & (held >= share)).sum(1).to(torch.float64)     # [B]
    return torch.where(held.isnan().any(1), torch.full_like(count, float("nan")), count)


def region_pixels(true_masks: torch.Tensor, background: int = 1, region: str = "background") -> torch.Tensor:
    """float64 [B, H*W]: 1 at the pixels of the region (the first `background` mask groups,
    or the groups after them for ``"objects"``), else 0."""
    if region not in ("background", "objects"):
        raise ValueError(f"region must be 'background' or 'objects', got {region!r}")
    groups = true_masks[:, :background] if region == "background" else true_masks[:, background:]
    return (groups.flatten(2) > 0).any(1).to(torch.float64)


def region_shares(true_masks: torch.Tensor, pred_masks: torch.Tensor, background: int = 1,
                  region: str = "background") -> torch.Tensor:
    """The share of a region's pixels each slot holds (by the argmax of its masks, ties to
    the first slot): float64 [B, K], rows summing to 1, NaN rows for images without pixels
    of that region. Arguments as in :func:`slots_owning`; ``.max(1)`` of the background's
    is how much of it one slot holds (1 when the background is one slot's)."""
    if true_masks.dim() != 4 or pred_masks.dim() != 4 or true_masks.shape[0] != pred_masks.shape[0] \
            or true_masks.shape[2:] != pred_masks.shape[2:]:
        raise ValueError(f"region_shares expects [B, G, H, W] and [B, K, H, W] masks, got shapes "
                         f"{tuple(true_masks.shape)} and {tuple(pred_masks.shape)}")
    inside = region_pixels(true_masks, background, region)               # [B, N]
    per_slot = _pixels_held(inside.unsqueeze(1), pred_masks).squeeze(1)  # [B, K] pixels held
    return per_slot / inside.sum(1, keepdim=True)                        # 0 / 0: NaN


def region_errors(x: torch.Tensor, true_masks: torch.Tensor, means: torch.Tensor, background: int = 1,
                  region: str = "background") -> torch.Tensor:
    """What each slot draws over a region: the mean of |mu_k - x| over the region's pixels
    and the channels, float64 [B, K] (NaN rows for images without pixels of the region).
    x [B, C, H, W], means [B, K, C, H, W]; the other arguments as in :func:`region_shares`.

    Where every slot draws the background's colour, the mixture scores its pixels alike
    whichever slot holds them, so no pixel sigma moves it from slot to slot
    (`benchmarks/background_share.py`)."""
    if x.dim() != 4 or means.dim() != 5 or means.shape[:1] + means.shape[2:] != x.shape \
            or true_masks.shape[0] != x.shape[0] or true_masks.shape[2:] != x.shape[2:]:
        raise ValueError(f"region_errors expects x [B, C, H, W], masks [B, G, H, W] and means [B, K, C, H, W], "
                         f"got {tuple(x.shape)}, {tuple(true_masks.shape)} and {tuple(means.shape)}")
    inside = region_pixels(true_masks, background, region)                         # [B, N]
    err = (means.double() - x.double()[:, None]).abs().mean(2).flatten(2)          # [B, K, N]
    return (err * inside[:, None]).sum(2) / inside.sum(1, keepdim=True)            # 0 / 0: NaN


FATES = ("clean", "cut", "merged")   # `object_fates` codes 0-2, in this order


class Fates(NamedTuple):
    """:func:`object_fates`: per image and object (the groups after the background)."""

    fate: torch.Tensor             # int64 [B, O]: index in FATES, -1 where the object has no pixel
    area: torch.Tensor             # float64 [B, O]: the object's pixels, 0 if absent
    share: torch.Tensor            # float64 [B, O]: share of the object's pixels its slot holds, NaN if absent
    to_background: torch.Tensor    # float64 [B, O]: share held by the background's slots (not its own)
    to_objects: torch.Tensor       # float64 [B, O]: share held by other objects' slots (not the background's)
    to_spare: torch.Tensor         # float64 [B, O]: share held by slots that are no object's nor the background's
    with_background: torch.Tensor  # bool [B, O]: its slot is one that holds most of a background group


def object_fates(true_masks: torch.Tensor, pred_masks: torch.Tensor, background: int = 1,
                 clean_share: float = 0.8) -> Fates:
    """What became of each object of each image: where a FG-ARI below 1 comes from.

    An object's slot is the one holding most of its pixels (pixels go to the slot of their
    largest mask, ties to the first, as in :func:`ari`). Each object present in an image
    gets the first fate that applies:

    * ``merged``: another object of the image has the same slot (FG-ARI sees one cluster);
    * ``cut``: its slot holds less than `clean_share` of its pixels, the rest went to
      other slots;
    * ``clean``: otherwise.

    The share its slot does not hold is split three ways, by who holds it: the background's
    slots (those holding most of a background group's pixels), the other objects' slots, or
    spare slots (neither): a cut object's rest in a spare slot is a piece a slot fewer could
    gather. ``with_background`` says whether its own slot is a background slot: FG-ARI does
    not see that, ARI does. With the background shared by every slot, many whole objects
    share a slot with its largest part; with the background in one slot, an object there
    was painted as background.

    Measured (docs/learning.md): the Multi-dSprites model whose sprites are blurred discs
    cuts 24% of its sprites and merges 17%; the five-slot Tetrominoes background model cuts
    20% of its objects, each leaving a quarter of its pixels in the spare slot.

    Args:
        true_masks: [B, G, H, W] 0/1 ground-truth masks, the first `background` groups the
            background.
        pred_masks: [B, K, H, W] predicted masks (probabilities or one-hot).
        background: leading groups that make the background.
        clean_share: the share of its pixels an object's slot must hold to be ``clean``, in
            (0, 1].
    Returns:
        :class:`Fates`, each field [B, G - background].
    """
    if true_masks.dim() != 4 or pred_masks.dim() != 4 or true_masks.shape[0] != pred_masks.shape[0] \
            or true_masks.shape[2:] != pred_masks.shape[2:]:
        raise ValueError(f"object_fates expects [B, G, H, W] and [B, K, H, W] masks, got shapes "
                         f"{tuple(true_masks.shape)} and {tuple(pred_masks.shape)}")
    if not 0 <= background <= true_masks.shape[1]:
        raise ValueError(f"background must lie in [0, {true_masks.shape[1]}], got {background}")
    if not 0.0 < clean_share <= 1.0:
        raise ValueError(f"clean_share must lie in (0, 1], got {clean_share}")
    K = pred_masks.shape[1]
    held = _pixels_held((true_masks.flatten(2) > 0).to(torch.float64), pred_masks)   # [B, G, K] pixels
    top, slot = held.max(2)                                                 # ties: the first slot
    present = held.sum(2) > 0                                               # [B, G]
    bg_slots = (F.one_hot(slot[:, :background], K).bool() & present[:, :background, None]).any(1)  # [B, K]
    held, top, obj_slot = held[:, background:], top[:, background:], slot[:, background:]   # the objects'
    area, obj_present = held.sum(2), present[:, background:]               # [B, O]
    same = (obj_slot[:, :, None] == obj_slot[:, None, :]) & obj_present[:, :, None] & obj_present[:, None, :]
    merged = same.sum(2) > 1
    share = top / area                                                      # 0 / 0: NaN
    cut = (share < clean_share) & ~merged
    fate = torch.where(merged, FATES.index("merged"), torch.where(cut, FATES.index("cut"), FATES.index("clean")))
    own = F.one_hot(obj_slot, K).bool()                                     # [B, O, K]
    obj_slots = (own & obj_present[:, :, None]).any(1)                      # [B, K]

    def held_by(slots: torch.Tensor) -> torch.Tensor:                       # slots: bool [B, (O,) K]
        return (held * slots.to(held.dtype)).sum(2) / area

    return Fates(torch.where(obj_present, fate, -1), area, share,
                 to_background=held_by(bg_slots[:, None] & ~own),
                 to_objects=held_by(obj_slots[:, None] & ~bg_slots[:, None] & ~own),
                 to_spare=held_by((~obj_slots & ~bg_slots)[:, None].expand_as(own)),
                 with_background=bg_slots.gather(1, obj_slot) & obj_present)


def summarize(values: torch.Tensor) -> float:
    """Nan-aware mean of per-image metric values (NaN if all are NaN or empty)."""
    values = values.detach().to(torch.float64).flatten()
    if values.numel() == 0:
        return float("nan")
    return float(torch.nanmean(values))


def mse(image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image over channels and pixels.

    Args:
        image, recon: [B, C, H, W] tensors on the [0, 1] scale.

    Returns:
        float64 tensor [B].
    """
    if image.dim() != 4 or image.shape != recon.shape:
        raise ValueError(
            f"mse expects two [B, C, H, W] tensors of equal shape, got "
            f"{tuple(image.shape)} and {tuple(recon.shape)}"
        )
    diff = image.to(torch.float64) - recon.to(torch.float64)  # diff: [B, C, H, W]
    return diff.pow(2).mean(dim=(1, 2, 3))


def slot_stability(true_masks: torch.Tensor, pred_masks: torch.Tensor, background: int = 1) -> torch.Tensor:
    """How often each ground-truth object stays in the same slot over the frames of a sequence.

    In every frame an object (a true group from index `background` on) is assigned the slot
    that holds most of its pixels (pixels go to their argmax slot, as in :func:`ari`; ties
    to the first slot). An object's stability is the fraction of the frames it is visible
    in (at least one pixel) in which it is assigned its most frequent slot: 1 when it never
    changes slot. Per sequence: the mean over objects visible in at least 2 frames.

    Args:
        true_masks: [B, F, G, H, W] 0/1 ground-truth masks; group identity is kept over frames.
        pred_masks: [B, F, K, H, W] predicted masks (probabilities or one-hot).
        background: leading groups that are not objects (Objects Room: 4).
    Returns:
        float64 [B]; NaN for a sequence with no object visible in 2 frames.
    """
    if true_masks.dim() != 5 or pred_masks.dim() != 5 or true_masks.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(f"slot_stability expects [B, F, G, H, W] and [B, F, K, H, W] masks, got shapes "
                         f"{tuple(true_masks.shape)} and {tuple(pred_masks.shape)}")
    K = pred_masks.shape[2]
    true = true_masks[:, :, background:].flatten(3).to(torch.float64)      # [B, F, G', N]
    overlap = _pixels_held(true, pred_masks)                                # [B, F, G', K] pixels
    visible = overlap.sum(-1) > 0                                           # [B, F, G']
    slot = F.one_hot(overlap.argmax(-1), K) * visible.unsqueeze(-1)         # [B, F, G', K]
    per_slot = slot.sum(1)                                                  # [B, G', K] frames
    frames = visible.sum(1)                                                 # [B, G']
    tracked = frames >= 2                                                   # [B, G']
    stability = per_slot.max(-1).values / frames.clamp(min=1)               # [B, G']
    total = torch.where(tracked, stability, torch.zeros_like(stability)).sum(1)  # [B]
    count = tracked.sum(1)                                                  # [B]
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
