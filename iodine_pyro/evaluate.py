"""One evaluation engine: named per-image metrics of every refinement step.

`METRICS` is the table that every report iterates: `evaluate` (images and sequences),
`compare`, the training log and the command line's tables. Each row computes one value
per image from a `Scored` step; adding a metric is one function and one row here.

FG-ARI drops the leading mask groups that the dataset's description calls background
(`iodine_pyro.data.background_groups`: 1 for most datasets, 4 for Objects Room: sky,
floor, two wall halves), in every path. Per-image values can be NaN where DeepMind's
ARI is undefined (see `iodine_pyro.metrics.ari`); means over images are nan-aware
(`metrics.summarize`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xarray as xr
from tqdm.auto import tqdm

from . import metrics
from .checkpoint import seeded
from .memory import check_memory
from .data import is_sequence, load_images
from .models.generative import Decoded, frame
from .run import Run
from .system import Iodine, StepResult

__all__ = ["METRICS", "Inferred", "Metric", "Scored", "batch_metrics", "evaluate", "inferred_batches", "score_steps"]


class Scored(NamedTuple):
    """One refinement step and what it is scored against."""

    system: Iodine
    x: torch.Tensor                  # [B, C, H, W] the image (frame) the step read
    step: StepResult
    true: torch.Tensor | None        # [B, G, H, W] ground-truth masks, when known
    background: int                  # leading groups FG-ARI drops
    next_x: torch.Tensor | None      # [B, C, H, W] the next frame of a sequence, or None
    shares: dict[str, torch.Tensor]  # `region_shares` of each region, filled by the first metric that reads it


def _shares(s: Scored, region: str) -> torch.Tensor | None:
    """[B, K] share of `region` each slot holds, computed once per step for every metric
    that reads it (`bg_slots` and `bg_share` both read the background's)."""
    if s.true is None:
        return None
    if region not in s.shares:
        s.shares[region] = metrics.region_shares(s.true, s.step.masks, s.background, region)
    return s.shares[region]


@dataclass(frozen=True)
class Metric:
    """One row of the table.

    Attributes:
        name: its key in results and JSON.
        label: its column heading.
        fmt: its format in tables.
        compute: `Scored` -> float64 [B], or None where it does not apply (no masks, no
            next frame).
        doc: what it is.
    """

    name: str
    label: str
    fmt: str
    compute: Callable[[Scored], torch.Tensor | None]
    doc: str


def _fg_ari(s: Scored) -> torch.Tensor | None:
    return None if s.true is None else metrics.ari(s.true, s.step.masks, foreground_only=s.background)


def _ari(s: Scored) -> torch.Tensor | None:
    return None if s.true is None else metrics.ari(s.true, s.step.masks)


def _owning(region: str) -> Callable[[Scored], torch.Tensor | None]:
    def compute(s: Scored) -> torch.Tensor | None:
        held = _shares(s, region)
        return None if held is None else metrics.owners(held)
    return compute


def _bg_share(s: Scored) -> torch.Tensor | None:
    held = _shares(s, "background")
    return None if held is None else held.max(1).values


def _next_nll(s: Scored) -> torch.Tensor | None:
    if s.next_x is None:
        return None
    pixels = s.system.model.likelihood(Decoded(s.step.means, s.step.mask_logits))
    return pixels.log_prob(s.next_x).neg().double()


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("fg_ari", "FG-ARI", ".4f", _fg_ari, "ARI of the masks' argmax without the background groups"),
    Metric("ari", "ARI", ".4f", _ari, "ARI of the masks' argmax over all labelled pixels"),
    Metric("bg_slots", "bg slots", ".2f", _owning("background"),
           "slots owning the background (argmax of >= 1% of its pixels): 1 when it is one slot's"),
    Metric("bg_share", "bg share", ".3f", _bg_share,
           "the largest share of the background's pixels one slot holds (argmax): 1 when it is one slot's"),
    Metric("fg_slots", "obj slots", ".2f", _owning("objects"),
           "slots owning the objects' pixels (argmax of >= 1% of them)"),
    Metric("mse", "MSE", ".5f", lambda s: metrics.mse(s.x, s.step.recon), "reconstruction MSE, [0, 1] scale"),
    Metric("kl", "KL", ".3f", lambda s: s.step.kl.double(), "KL(q || p), nats, summed over slots and dims"),
    Metric("nll", "NLL", ".1f", lambda s: s.step.nll.double(), "-log p(x | z) of the step's sample, nats"),
    Metric("pred_nll", "next NLL", ".1f", _next_nll,
           "sequences: -log p(next frame | z of this frame), nats (next-step prediction)"),
]}


def score_steps(system: Iodine, x: torch.Tensor, steps: list[StepResult], true: torch.Tensor | None,
                background: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{metric: [L, B]} over the L steps of a batch (rows where a metric does not apply are
    left out: a metric absent from every step is absent from the result).

    Args:
        x: [B, C, H, W] images, or [B, F, C, H, W] sequences (step t scores frame t).
        true: ground-truth masks [B, G, H, W] (or [B, F, G, H, W]), or None.
    """
    out: dict[str, list[torch.Tensor]] = {}
    sequence = x.dim() == 5
    for t, step in enumerate(steps):
        nxt = x[:, t + 1] if sequence and t + 1 < x.shape[1] else None
        s = Scored(system, frame(x, t), step, frame(true, t) if true is not None else None, background, nxt, {})
        for name in names or METRICS:
            value = METRICS[name].compute(s)
            if value is not None:
                out.setdefault(name, []).append(value.detach().cpu())
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def batch_metrics(system: Iodine, batch: dict[str, torch.Tensor], background: int) -> dict[str, Any]:
    """The table's metrics on one batch (the training log): the final refinement step's
    under their names, and every step's under ``per_step`` ({metric: [value per step]})."""
    steps = system.infer(batch["image"])
    last = len(steps) - 1
    x = batch["image"][:, :last + 1] if batch["image"].dim() == 5 else batch["image"]
    true = batch.get("mask")
    true = true[:, :last + 1] if true is not None and true.dim() == 5 else true
    scores = {k: v for k, v in score_steps(system, x, steps, true, background).items() if len(v) == len(steps)}
    return {**{k: metrics.summarize(v[-1]) for k, v in scores.items()},
            "per_step": {k: [round(metrics.summarize(row), 5) for row in v] for k, v in scores.items()}}


class Inferred(NamedTuple):
    """One batch of held-out images and the guide's refinement steps on it."""

    x: torch.Tensor                  # [b, C, H, W] images, or [b, F, C, H, W] sequences cut to the steps' frames
    true: torch.Tensor | None        # ground-truth masks [b, G, H, W] (or [b, F, G, H, W]), when the store has them
    steps: list[StepResult]          # one per refinement step (per frame for a sequence run)


def inferred_batches(run: Run, ds: xr.Dataset, *, num_images: int, batch_size: int,
                     num_iters: int | None = None, num_slots: int | None = None, seed: int = 0,
                     progress: bool = False, desc: str = "evaluate") -> Iterator[Inferred]:
    """The guide's inference on the first `num_images` images of `ds`, `batch_size` at a
    time: the draw `evaluate` scores, for any other reader of the same steps
    (`benchmarks/object_fates.py`, `benchmarks/background_share.py`,
    `benchmarks/decoder_limit.py`).

    The sampling is seeded by `seed` while the iteration runs and the caller's random
    stream is restored when it ends, so the same arguments give the same steps; the batch
    size is part of the draw (FG-ARI 0.01 apart between batch sizes 32 and 64 on
    Multi-dSprites). The caller's code between batches runs on the same stream: what it
    draws at random changes the later batches' steps.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("`num_images` and `batch_size` must be at least 1")
    n = min(num_images, ds.sizes["image"])
    sequence = is_sequence(ds)
    bar = tqdm(total=n, disable=not progress, desc=desc, unit="img", dynamic_ncols=True)
    try:
        with seeded(seed, torch.empty(0, device=run.device)), torch.no_grad():   # the caller's stream is left as it was
            for start in range(0, n, batch_size):
                batch = load_images(ds, start, min(start + batch_size, n))
                x = batch["image"].to(run.device)                                  # [b, (F,) C, H, W]
                true = batch["mask"].to(run.device) if "mask" in batch else None
                steps = run.system.infer(x, num_iters=num_iters, num_slots=num_slots)   # one per step (frame)
                if sequence:
                    x, true = x[:, :len(steps)], true[:, :len(steps)] if true is not None else None
                yield Inferred(x, true, steps)
                bar.update(x.shape[0])
    finally:
        bar.close()


def evaluate(run: Run | str | Path, *, num_images: int = 256, batch_size: int = 32,
             data: str | Path | None = None, num_iters: int | None = None,
             num_slots: int | None = None, seed: int = 0, device: str = "cpu",
             amp: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """The table's metrics at every refinement step over the first `num_images` images of
    the run's held-out set (or `data`).

    Returns a dict with a list over refinement steps (over frames for a sequence run, one
    step per frame) for every metric of `METRICS` that applies; for sequences also
    ``slot_stability`` (`metrics.slot_stability`, a nan-aware mean over sequences) and
    ``sequence``; plus the settings used (``data``, ``num_images``, ``step``,
    ``precision``, ...). `amp`: bf16 autocast (`Run.set_precision`); None leaves a `Run`
    as it is and opens a path in float32.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("`num_images` and `batch_size` must be at least 1")
    run = Run.of(run, device, amp)
    check_memory(run.cfg, run.device, batch=batch_size, num_slots=num_slots, num_iters=num_iters, training=False,
                 what="evaluate")
    ds, where = run.dataset(data, need=None, command="evaluate")
    sequence = is_sequence(ds)
    background = run.background_groups(ds)
    n = min(num_images, ds.sizes["image"])
    parts: dict[str, list[torch.Tensor]] = {}
    stability = []
    for x, true, steps in inferred_batches(run, ds, num_images=n, batch_size=batch_size, num_iters=num_iters,
                                           num_slots=num_slots, seed=seed, progress=progress):
        for k, v in score_steps(run.system, x, steps, true, background).items():
            parts.setdefault(k, []).append(v)                                   # [steps, b]
        if sequence and true is not None:
            masks = torch.stack([s.masks for s in steps], 1)                    # [b, frames, K, H, W]
            stability.append(metrics.slot_stability(true, masks, background).cpu())
    result: dict[str, Any] = {k: [metrics.summarize(row) for row in torch.cat(v, 1)] for k, v in parts.items()}
    cfg = run.cfg
    result.update(num_images=n, data=where, step=run.step, dataset=cfg.dataset, preset=cfg.preset,
                  guide=cfg.guide.kind, num_slots=num_slots or cfg.model.num_slots,
                  num_iters=len(result["mse"]), background_groups=background, precision=run.system.precision)
    if sequence:
        result.update(sequence=True, slot_stability=metrics.summarize(torch.cat(stability))
                      if stability else float("nan"))
    return result


def table(result: dict[str, Any], names: list[str] | None = None, first: str = "t") -> list[str]:
    """The lines of a per-step table of `result` (one row per step, one column per metric of
    `METRICS` it holds)."""
    names = [n for n in (names or METRICS) if n in result]
    head = f"{first:>5} " + " ".join(f"{METRICS[n].label:>10}" for n in names)
    lines = [head]
    for t in range(result["num_iters"]):
        cells = []
        for n in names:
            values = result[n]
            cells.append(f"{values[t]:>10{METRICS[n].fmt}}" if t < len(values) else f"{'':>10}")
        lines.append(f"{t + 1:>5} " + " ".join(cells))
    return lines
