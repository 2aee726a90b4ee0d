"""Tests for iodine_pyro.metrics (ARI / FG-ARI, summarize, MSE, slots owning a region, object fates)."""

import itertools
import json
import math
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iodine_pyro.evaluate import evaluate
from iodine_pyro.metrics import FATES, ari, mse, object_fates, region_errors, region_shares, slots_owning, summarize

from ..helpers import ENV

ROOT = Path(__file__).resolve().parents[2]

PROPERTY = settings(
    derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------------------- helpers


def onehot_masks(labels, n_groups):
    """labels: int array [B, H, W] with -1 = unlabelled -> float64 masks [B, G, H, W]."""
    labels = torch.as_tensor(np.asarray(labels))
    masks = torch.zeros(labels.shape[0], n_groups, *labels.shape[1:], dtype=torch.float64)  # [B, G, H, W]
    valid = labels >= 0
    masks.scatter_(1, labels.clamp(min=0).unsqueeze(1), valid.unsqueeze(1).double())
    return masks


def label_rows(true_labels, pred_labels):
    """1-D true/pred label lists (one image) -> [1, G, 1, N] and [1, K, 1, N] masks."""
    t = np.asarray(true_labels)[None, None, :]
    p = np.asarray(pred_labels)[None, None, :]
    return onehot_masks(t, max(t.max(), 0) + 1), onehot_masks(p, p.max() + 1)


def reference_ari(true_labels, pred_labels, first_group=0):
    """Pair-counting ARI of one image with explicit loops and exact fractions.

    true_labels: flat ints, -1 = ignored pixel; pred_labels: flat ints; first_group: the
    label of the first remaining ground-truth group (an ignored pixel's id, officially).
    The official special case first: every pixel (ignored ones as `first_group`) in one
    true group and one predicted slot -> 1.0; then a 0/0 formula -> NaN.
    """
    ids = {t if t >= 0 else first_group for t in true_labels}
    if len(ids) == 1 and len(set(pred_labels)) == 1:
        return 1.0
    pix = [(t, p) for t, p in zip(true_labels, pred_labels) if t >= 0]
    pairs = same_true = same_pred = same_both = 0
    for (t1, p1), (t2, p2) in itertools.combinations(pix, 2):
        pairs += 1
        same_true += t1 == t2
        same_pred += p1 == p2
        same_both += (t1 == t2) and (p1 == p2)
    if pairs == 0:
        return math.nan
    expected = Fraction(same_true * same_pred, pairs)
    denom = Fraction(same_true + same_pred, 2) - expected
    if denom == 0:
        return math.nan
    return float((same_both - expected) / denom)


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-9, atol=1e-12)


@st.composite
def problems(draw, max_groups=4, max_slots=5, max_side=4, allow_unlabelled=True):
    """Random (true_labels [B,H,W] with -1 = unlabelled, G, pred logits [B,K,H,W])."""
    B = draw(st.integers(1, 3))
    G = draw(st.integers(1, max_groups))
    K = draw(st.integers(1, max_slots))
    H, W = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.integers(-1 if allow_unlabelled else 0, G, size=(B, H, W))
    logits = torch.as_tensor(rng.normal(size=(B, K, H, W)))
    return labels, G, logits


def argmax_onehot(pred):
    return torch.nn.functional.one_hot(pred.argmax(1), pred.shape[1]).permute(0, 3, 1, 2).double()


# --------------------------------------------------------------------------- known values


@pytest.mark.parametrize(
    "true_labels, pred_labels, expected",
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0),
        ([0, 0, 1, 1], [1, 1, 0, 0], 1.0),
        ([0, 0, 1, 1], [0, 0, 1, 2], 4 / 7),  # sklearn docs example
        ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], 8 / 33),  # sklearn docs example
        ([0, 0, 1, 1], [0, 0, 0, 1], 0.0),
        ([0, 0, 1, 1], [0, 1, 0, 1], -0.5),
        ([0, 0, -1, 1, 1], [0, 0, 1, 1, 1], 1.0),  # ignored pixel does not count
    ],
)
def test_hand_computed(true_labels, pred_labels, expected):
    t, p = label_rows(true_labels, pred_labels)
    assert ari(t, p).item() == pytest.approx(expected, abs=1e-12)


@PROPERTY
@given(problems(), st.sampled_from([False, True, 2]))
def test_matches_pair_counting_reference(problem, fg):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    n_drop = min(int(fg), G)
    ref_labels = np.where(labels < n_drop, -1, labels)
    pred_labels = logits.argmax(1).numpy()
    expected = torch.tensor(
        [reference_ari(t.ravel(), p.ravel(), n_drop) if n_drop < G else math.nan   # no group left: NaN
         for t, p in zip(ref_labels, pred_labels)], dtype=torch.float64
    )
    assert_same(ari(masks, logits, foreground_only=fg if isinstance(fg, bool) else n_drop), expected)


# --------------------------------------------------------------------------- properties


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1), st.booleans())
def test_invariant_to_slot_permutation(problem, seed, fg):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(logits.shape[1]))
    assert_same(ari(masks, logits[:, perm], fg), ari(masks, logits, fg))


@PROPERTY
@given(problems(allow_unlabelled=False), st.integers(0, 2**32 - 1))
def test_invariant_to_true_group_permutation(problem, seed):
    # (With ignored pixels the official single-cluster test counts them as group 0, so a
    # permutation can change a degenerate image's value: see test_official_single_cluster_rule.)
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(G))
    assert_same(ari(masks[:, perm], logits), ari(masks, logits))


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1), st.integers(0, 2))
def test_perfect_segmentation_is_one(problem, seed, extra_slots):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(G + extra_slots))
    pred = torch.cat([masks, torch.zeros(masks.shape[0], extra_slots, *masks.shape[2:])], 1)[:, perm]
    # Unlabelled pixels may be predicted anywhere: put them in random slots.
    noise = torch.as_tensor(np.random.default_rng(seed + 1).normal(size=pred.shape))
    pred = pred + (masks.sum(1, keepdim=True) == 0) * argmax_onehot(noise)
    # With at least two true groups present: 1, unless no group has >= 2 pixels (then the
    # formula is 0/0 -> NaN). (One group: a degenerate case, see the edge cases below.)
    sizes = masks.sum(dim=(2, 3))                                   # [B, G]
    several = (sizes > 0).sum(1) >= 2
    expected = torch.where(sizes.amax(1) >= 2, 1.0, math.nan).double()
    assert_same(ari(masks, pred)[several], expected[several])


@PROPERTY
@given(problems())
def test_prediction_vs_itself(problem):
    _, _, logits = problem
    self_masks = argmax_onehot(logits)
    sizes = self_masks.sum(dim=(2, 3))  # [B, K]
    # One cluster: 1 (the official special case, even for a single pixel); several: 1,
    # unless every pixel is its own cluster: then the formula is 0/0 -> NaN.
    one = (sizes > 0).sum(1) == 1
    expected = torch.where(one | (sizes.amax(1) >= 2), 1.0, math.nan).double()
    assert_same(ari(self_masks, logits), expected)


@PROPERTY
@given(problems(allow_unlabelled=False))
def test_symmetric_for_full_partitions(problem):
    labels, G, logits = problem
    a, b = onehot_masks(labels, G), argmax_onehot(logits)
    assert_same(ari(a, b), ari(b, a))


@PROPERTY
@given(problems(), st.sampled_from([False, True, 1, 3]))
def test_at_most_one(problem, fg):
    labels, G, logits = problem
    result = ari(onehot_masks(labels, G), logits, foreground_only=fg if isinstance(fg, bool) else min(fg, G))
    assert result.dtype == torch.float64 and result.shape == (labels.shape[0],)
    assert torch.all(torch.isnan(result) | (result <= 1.0 + 1e-12))


@PROPERTY
@given(problems(), st.booleans())
def test_probabilities_equal_their_argmax(problem, fg):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    probs = torch.softmax(logits, dim=1).float()
    assert_same(ari(masks, probs, fg), ari(masks, argmax_onehot(logits), fg))


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1))
def test_fg_ari_ignores_background_predictions(problem, seed):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    background = torch.as_tensor(labels == 0).unsqueeze(1)  # [B, 1, H, W]
    noise = torch.as_tensor(np.random.default_rng(seed).normal(size=logits.shape))
    changed = torch.where(background, noise, logits)
    # With two foreground groups present; with one, the official single-cluster test looks
    # at every pixel's prediction (test_official_single_cluster_rule).
    several = (masks[:, 1:].sum(dim=(2, 3)) > 0).sum(1) >= 2
    assert_same(ari(masks, changed, foreground_only=True)[several], ari(masks, logits, foreground_only=True)[several])


@PROPERTY
@given(problems())
def test_foreground_only_int_drops_leading_groups(problem):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    assert_same(ari(masks, logits, foreground_only=1), ari(masks, logits, foreground_only=True))
    for n in range(G + 1):
        assert_same(ari(masks, logits, foreground_only=n), ari(masks[:, n:], logits))


# --------------------------------------------------------------------------- edge cases


def test_both_single_cluster_is_one():
    t, p = label_rows([0, 0, 0, 0], [2, 2, 2, 2])
    assert ari(t, p).item() == 1.0
    # FG-ARI: one object and every pixel, background included, in one slot
    t, p = label_rows([0, 0, 1, 1, 1], [3, 3, 3, 3, 3])
    assert ari(t, p, foreground_only=True).item() == 1.0


def test_official_single_cluster_rule():
    """DeepMind's special case looks at every pixel: one foreground object all in one
    slot, with the background in another slot, is 0/0 there -> NaN (not 1)."""
    t, p = label_rows([0, 0, 1, 1, 1], [0, 1, 3, 3, 3])
    assert math.isnan(ari(t, p, foreground_only=True).item())
    # an ignored pixel counts as group 0 in that test: a single scored pixel whose
    # group is the first one, everything predicted alike -> 1
    t, p = label_rows([-1, 0, -1], [0, 0, 0])
    assert ari(t, p).item() == 1.0
    t, p = label_rows([-1, 1, -1], [0, 0, 0])                        # its group is not the first
    assert math.isnan(ari(t, p).item())


def test_single_object_split_is_zero():
    # One foreground object over two predicted segments: numerator 0,
    # denominator > 0, so ARI is exactly 0 (as in the official code), not NaN.
    t, p = label_rows([0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1])
    assert ari(t, p, foreground_only=True).item() == 0.0
    # ...and symmetrically several true objects predicted as one segment.
    t, p = label_rows([0, 1, 1, 2, 2], [0, 1, 1, 1, 1])
    assert ari(t, p, foreground_only=True).item() == 0.0


@pytest.mark.parametrize(
    "true_labels, pred_labels",
    [
        ([-1, -1, -1], [0, 1, 0]),  # all-zero true masks
        ([-1, 0, -1], [0, 1, 0]),  # a single scored pixel
        ([0, 1, 2], [2, 0, 1]),  # all singletons on both sides: 0/0
    ],
)
def test_degenerate_cases_are_nan_without_warnings(true_labels, pred_labels):
    t, p = label_rows(true_labels, pred_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(ari(t, p).item())


def test_all_zero_masks_batch_and_fg_dropping_everything():
    t = torch.zeros(2, 3, 4, 4)
    p = torch.rand(2, 5, 4, 4)
    assert torch.isnan(ari(t, p)).all()
    t = onehot_masks(np.random.default_rng(0).integers(0, 3, size=(2, 4, 4)), 3)
    assert torch.isnan(ari(t, p, foreground_only=3)).all()


@pytest.mark.parametrize("true_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
@pytest.mark.parametrize("pred_dtype", [torch.float16, torch.float32, torch.float64, torch.bool])
def test_input_dtypes(true_dtype, pred_dtype):
    t, p = label_rows([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2])
    result = ari(t.to(true_dtype), p.to(pred_dtype))
    assert result.dtype == torch.float64
    assert result.item() == pytest.approx(8 / 33)


@pytest.mark.parametrize(
    "true_shape, pred_shape, foreground_only",
    [
        ((2, 3, 4, 4), (1, 3, 4, 4), False),  # batch mismatch
        ((2, 3, 4, 4), (2, 3, 4, 5), False),  # width mismatch
        ((2, 3, 5, 4), (2, 3, 4, 4), False),  # height mismatch
        ((3, 4, 4), (3, 4, 4), False),  # not 4-D
        ((2, 3, 4, 4), (2, 0, 4, 4), False),  # no slots
        ((2, 3, 4, 4), (2, 3, 4, 4), 4),  # dropping more groups than exist
        ((2, 3, 4, 4), (2, 3, 4, 4), -1),
    ],
)
def test_invalid_inputs_raise(true_shape, pred_shape, foreground_only):
    with pytest.raises(ValueError):
        ari(torch.zeros(true_shape), torch.zeros(pred_shape), foreground_only=foreground_only)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    t = onehot_masks(rng.integers(-1, 4, size=(4, 8, 8)), 4)
    p = torch.as_tensor(rng.normal(size=(4, 6, 8, 8)))
    result = ari(t.cuda(), p.cuda().float(), foreground_only=True)
    assert result.is_cuda
    assert_same(result.cpu(), ari(t, p, foreground_only=True))


# --------------------------------------------------------------------------- summarize / mse


def test_summarize_is_nan_aware():
    assert summarize(torch.tensor([1.0, float("nan"), 0.5])) == pytest.approx(0.75)
    assert math.isnan(summarize(torch.tensor([float("nan"), float("nan")])))
    assert math.isnan(summarize(torch.tensor([])))


def test_mse_hand_value():
    image = torch.zeros(2, 1, 2, 2)
    recon = torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.allclose(mse(image, recon), torch.tensor([0.3125, 0.0], dtype=torch.float64))
    image = torch.ones(1, 3, 2, 2)
    recon = torch.full((1, 3, 2, 2), 0.75)
    assert mse(image, recon).item() == pytest.approx(0.0625)
    with pytest.raises(ValueError):
        mse(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))


# --------------------------------------------------------------------------- slots owning a region


def test_slots_owning_hand_computed():
    # one image of 10 pixels: background (group 0) is pixels 0-7, an object (group 1) 8-9
    true, pred = label_rows([0] * 8 + [1] * 2, [0, 0, 0, 0, 0, 0, 0, 1, 2, 2])
    assert slots_owning(true, pred).item() == 2                        # slots 0 and 1 share it
    assert slots_owning(true, pred, share=0.2).item() == 1             # slot 1 holds 1/8 < 20%
    assert slots_owning(true, pred, region="objects").item() == 1      # slot 2 alone


def test_slots_owning_background_in_one_slot_and_spread():
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]])                   # background, two objects
    true = onehot_masks(labels[:, None], 3)
    one = onehot_masks(torch.tensor([[3, 3, 3, 3, 0, 0, 1, 1]])[:, None], 4)
    spread = onehot_masks(torch.tensor([[0, 1, 2, 3, 0, 0, 1, 1]])[:, None], 4)
    assert slots_owning(true, one).item() == 1
    assert slots_owning(true, spread).item() == 4
    assert slots_owning(true, one, region="objects").item() == 2
    assert region_shares(true, one).tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert region_shares(true, spread).tolist() == [[0.25, 0.25, 0.25, 0.25]]
    assert region_shares(true, one, region="objects").tolist() == [[0.5, 0.5, 0.0, 0.0]]
    nothing = onehot_masks(torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2]])[:, None], 3)   # no background pixel
    assert region_shares(nothing, one).isnan().all() and slots_owning(nothing, one).isnan().all()


def test_region_errors_hand_computed():
    """Per slot, |mu_k - x| averaged over the region's pixels and the channels."""
    true = onehot_masks(torch.tensor([[0, 0, 1, 1]])[:, None], 2)      # [1, 2, 1, 4]: background, one object
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4).expand(1, 2, 1, 4)       # 2 channels
    black = torch.zeros(1, 2, 1, 4)
    own = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 2, 1, 2).repeat(1, 1, 1, 2)   # the object's colour
    own[0, 1, 0, 0] = 0.5                                               # one channel of one pixel half-way
    means = torch.stack([black, own], 1)                                # [1, K=2, C=2, 1, 4]
    assert region_errors(x, true, means).tolist() == [[0.0, (1 + 1 + 1 + 0.5) / 4]]
    assert region_errors(x, true, means, region="objects").tolist() == [[1.0, 0.0]]
    assert region_errors(x, onehot_masks(torch.ones(1, 1, 4, dtype=torch.long), 2), means).isnan().all()
    with pytest.raises(ValueError, match="region_errors expects"):
        region_errors(x, true, means[:, :, :1])


def test_slots_owning_no_region_is_nan_and_bad_input_raises():
    true, pred = label_rows([1, 1, 1], [0, 1, 1])                       # no background pixel
    assert math.isnan(slots_owning(true, pred).item())
    with pytest.raises(ValueError):
        slots_owning(true, pred, region="sky")
    with pytest.raises(ValueError):
        slots_owning(true[0], pred)


@PROPERTY
@given(problems(), st.integers(0, 2**32 - 1), st.sampled_from(["background", "objects"]))
def test_slots_owning_invariant_to_slot_permutation_and_bounded(problem, seed, region):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(logits.shape[1]))
    a, b = slots_owning(masks, logits, 1, region), slots_owning(masks, logits[:, perm], 1, region)
    assert_same(a, b)
    finite = a[~torch.isnan(a)]
    assert ((finite >= 1) & (finite <= logits.shape[1])).all()


# --------------------------------------------------------------------------- what became of each object


def test_object_fates_hand_computed():
    # background (0): pixels 0-5; object 1 clean, object 2 cut in half, objects 3 and 4 in one
    # slot, object 5 painted by the background's slot, object 6 absent
    true, pred = label_rows([0] * 6 + [1] * 4 + [2] * 4 + [3] * 2 + [4] * 2 + [5] * 2,
                            [0] * 6 + [1, 1, 1, 1] + [2, 2, 3, 3] + [4, 4] + [4, 4] + [0, 0])
    true = torch.cat([true, torch.zeros_like(true[:, :1])], 1)               # group 6: no pixel
    f = object_fates(true, pred)
    assert [FATES[i] if i >= 0 else None for i in f.fate[0].tolist()] == \
        ["clean", "cut", "merged", "merged", "clean", None]
    assert f.share[0, :5].tolist() == [1.0, 0.5, 1.0, 1.0, 1.0] and math.isnan(f.share[0, 5])
    assert f.area[0].tolist() == [4.0, 4.0, 2.0, 2.0, 2.0, 0.0]
    assert f.to_spare[0, :5].tolist() == [0.0, 0.5, 0.0, 0.0, 0.0]          # slot 3 holds no object's most
    assert f.with_background[0].tolist() == [False, False, False, False, True, False]
    # object 1 drawn half by the background's slot and half by object 2's: where its rest went
    f = object_fates(*label_rows([0] * 4 + [1] * 4 + [2] * 4, [0] * 4 + [1, 1, 0, 2] + [2] * 4))
    assert f.share[0].tolist() == [0.5, 1.0] and FATES[f.fate[0, 0]] == "cut"
    assert (f.to_background[0, 0], f.to_objects[0, 0], f.to_spare[0, 0]) == (0.25, 0.25, 0.0)
    assert FATES[object_fates(true, pred, clean_share=0.5).fate[0, 1]] == "clean"
    no_background = object_fates(true, pred, background=0)                  # group 0 an object like the rest
    assert [FATES[f] if f >= 0 else None for f in no_background.fate[0].tolist()] == \
        ["merged", "clean", "cut", "merged", "merged", "merged", None]
    assert not no_background.with_background.any()


def test_object_fates_bad_input_raises():
    true, pred = label_rows([0, 1, 1], [0, 1, 1])
    for kwargs in ({"clean_share": 0.0}, {"clean_share": 1.5}, {"background": 3}):
        with pytest.raises(ValueError):
            object_fates(true, pred, **kwargs)
    with pytest.raises(ValueError):
        object_fates(true[0], pred)


@PROPERTY
@given(problems(allow_unlabelled=False), st.integers(0, 2**32 - 1), st.integers(0, 2))
def test_object_fates_laws(problem, seed, extra_slots):
    labels, G, logits = problem
    masks = onehot_masks(labels, G)
    f = object_fates(masks, logits)
    fate, share, with_background = f.fate, f.share, f.with_background
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(logits.shape[1]))
    p = object_fates(masks, logits[:, perm])
    pf, ps, pw = p.fate, p.share, p.with_background
    present = masks[:, 1:].flatten(2).sum(2) > 0
    assert (fate >= 0).eq(present).all() and share.isnan().eq(~present).all()
    assert ((fate >= -1) & (fate < len(FATES))).all()
    whole = share + f.to_background + f.to_objects + f.to_spare             # every pixel held by one slot
    assert torch.allclose(whole[present], torch.ones_like(whole[present]))
    # relabelling the slots changes nothing, unless a tie moves an object's slot
    ties = (masks.flatten(2) > 0).double() @ torch.nn.functional.one_hot(logits.flatten(2).argmax(1),
                                                                            logits.shape[1]).double()
    tied = (ties == ties.max(2, keepdim=True).values).sum(2) > 1
    if not tied.any():
        assert fate.equal(pf) and with_background.equal(pw)
        assert_same(share, ps)
    # the true segmentation itself: every present object clean and whole
    perfect = torch.cat([masks, torch.zeros(masks.shape[0], extra_slots, *masks.shape[2:], dtype=masks.dtype)], 1)
    f = object_fates(masks, perfect[:, torch.randperm(perfect.shape[1], generator=torch.Generator().manual_seed(seed % 2**31))])
    fate, share, with_background = f.fate, f.share, f.with_background
    assert (fate[present] == FATES.index("clean")).all() and (share[present] == 1).all()
    assert not with_background.any()


def test_object_fates_script_sorts_every_object_and_matches_evaluate(runs, tmp_path):
    out = tmp_path / "fates.json"
    script = ROOT / "benchmarks" / "object_fates.py"
    proc = subprocess.run([sys.executable, str(script), str(runs["iterative"]), "--num-images", "12",
                           "--batch-size", "5", "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(out.read_text())
    counts = [v["objects"] for v in result["fates"].values()]
    assert list(result["fates"]) == list(FATES) and sum(counts) == result["objects"] > 0
    assert math.isclose(sum(v["fraction"] for v in result["fates"].values()), 1.0)
    assert sum(v["images"] for v in result["by_objects"].values()) == result["images"] == 12
    for v in result["fates"].values():
        if v["objects"]:
            assert math.isclose(v["share"] + v["to_background"] + v["to_objects"] + v["to_spare"], 1.0)
    # the same seeded inference as evaluate at the same batch size
    same = evaluate(runs["iterative"], num_images=12, batch_size=5, progress=False)
    assert math.isclose(result["fg_ari"], same["fg_ari"][-1], rel_tol=1e-9)
    assert "clean" in proc.stdout and "FG-ARI" in proc.stdout


def test_decoder_limit_script_never_draws_worse_than_the_guide(runs, tmp_path):
    out = tmp_path / "limit.json"
    script = ROOT / "benchmarks" / "decoder_limit.py"
    proc = subprocess.run([sys.executable, str(script), str(runs["iterative"]), "--num-images", "6", "--steps", "20",
                           "--batch-size", "4", "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["guide sample", "guide mean", "fitted z"] and result["images"] == 6
    # the fitted z starts at the guide's mean and keeps the best it meets
    assert rows["fitted z"]["nll"] <= rows["guide mean"]["nll"]
    # the guide's sample is the draw evaluate scores
    same = evaluate(runs["iterative"], num_images=6, batch_size=4, progress=False)
    assert math.isclose(rows["guide sample"]["fg_ari"], same["fg_ari"][-1], rel_tol=1e-9)
    assert math.isclose(rows["guide sample"]["mse"], same["mse"][-1], rel_tol=1e-6)
    assert "fitted z" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), str(runs["iterative"]), "--steps", "-1"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and "--steps" in bad.stderr
