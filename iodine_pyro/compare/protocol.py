"""The comparison itself: every guide on the same images, its estimates per refinement
step, q*, the cost, the generalisation, and a plan that fits a time limit."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from torch.distributions import Normal
from tqdm.auto import tqdm

from .. import metrics
from ..evaluate import METRICS as TABLE
from ..evaluate import score_steps
from ..memory import check_memory
from ..checkpoint import seeded
from ..posterior import check_slots
from ..run import Run
from ..system import Iodine
from .estimators import (
    PIXEL_BUDGET,
    _elbo_iwae,
    fit_cost,
    fit_gaussian,
    importance_log_weights,
    log_mean_exp,
    mean_and_se,
    model_log_joint,
    pareto_khat,
)
from .scenes import load_images_for

log = logging.getLogger(__name__)

OWN = ("elbo", "iwae", "nll", "kl", "amortization_gap", "inference_gap")   # this package's estimators
GAPS = ("amortization_gap", "inference_gap")
# ... and every per-image metric of the evaluation table that they do not define
METRICS = OWN + tuple(k for k in TABLE if k not in OWN and k != "pred_nll")


def evaluate_guide(system: Iodine, x: torch.Tensor, masks: torch.Tensor | None, *,
                   num_iters: int | None = None, num_slots: int | None = None,
                   iw_samples: int = 16, evidence_samples: int = 0, gap_steps: int = 200, gap_lr: float = 0.01,
                   gap_check_every: int = 25, gap_patience: int = 4, background: int = 1,
                   tick=None) -> dict[str, torch.Tensor]:
    """Per-image values of every metric at every step for one batch, the decoder fixed.

    The evaluation table's metrics (`iodine_pyro.evaluate.METRICS`) come from the engine
    (FG-ARI dropping `background` groups), the estimators from this module. q* is fitted
    (`fit_gaussian`, at most `gap_steps` steps) from the guide's posterior at the trained
    step T (the last step when fewer are run) and, separately, from the prior; per image
    the better of the two is q*. With `evidence_samples` S > 0, log p(x) is estimated by
    importance sampling with the guide's posterior at that step as proposal (S samples),
    with the Pareto k-hat of its weights. `tick(n)` reports work done in decodings of one
    image's slots (`step_cost`, `fit_cost`, S per image for log p(x)).

    Returns:
        {metric: [L, B]} for `METRICS`; [B] each: ``optimized_{elbo,iwae,kl,nll}`` (q*),
        the same ``..._from_guide`` / ``..._from_prior`` per start, ``gap_steps_from_*``;
        with S > 0 ``log_px``, ``khat``, ``approximation_gap``; ``cpu_seconds`` [B]
        (the guide's inference, shared equally by the batch's images).
    """
    tick = tick or (lambda n=1: None)
    B = x.shape[0]
    c0 = time.process_time()
    steps = system.infer(x, num_iters=num_iters, num_slots=num_slots)    # L x StepResult
    cpu = (time.process_time() - c0) / x.shape[0]
    tick(B * GUIDE_PASS * len(steps))                                    # the guide's own passes
    trained = min(len(system.weights()), len(steps)) - 1 if system.guide.refines else 0
    per: dict[str, list[torch.Tensor]] = {k: [] for k in OWN if k not in GAPS}
    for s in steps:
        q = system.guide.posterior(s.lam)                                 # batch [B, K, n_z]
        for k, v in _elbo_iwae(system, x, q, iw_samples).items():
            per[k].append(v.double())
        tick(B * iw_samples)                                             # its ELBO / IWAE samples
    nan = torch.full((len(steps), x.shape[0]), float("nan"), dtype=torch.float64)
    table = score_steps(system, x, steps, masks, background, [k for k in METRICS if k in TABLE and k not in OWN])
    q_guide = system.guide.posterior(steps[trained].lam)
    K = q_guide.loc.shape[1]
    log_joint = model_log_joint(system, x)
    opt: dict[str, torch.Tensor] = {}
    with _decoder_fixed(system):
        prior = system.model.prior(x.shape[0], K, like=x)
        for start, q0 in (("guide", q_guide), ("prior", Normal(prior.loc, prior.scale))):
            q_star, took = fit_gaussian(log_joint, q0, lr=gap_lr, check_every=gap_check_every,
                                        patience=gap_patience, max_steps=gap_steps, tick=tick)
            opt.update({f"optimized_{k}_from_{start}": v.double()
                        for k, v in _elbo_iwae(system, x, q_star, iw_samples).items()})
            tick(B * iw_samples)
            opt[f"gap_steps_from_{start}"] = took.double()
        better = opt["optimized_elbo_from_guide"] >= opt["optimized_elbo_from_prior"]   # [B]
        for k in ("elbo", "iwae", "kl", "nll"):
            a, b = opt[f"optimized_{k}_from_guide"], opt[f"optimized_{k}_from_prior"]
            opt[f"optimized_{k}"] = torch.where(better, a, b)
        if evidence_samples:
            log_w = importance_log_weights(log_joint, q_guide, evidence_samples, _chunk(x, K)).double()   # [S, B]
            opt["log_px"], opt["khat"] = log_mean_exp(log_w), pareto_khat(log_w)
            opt["approximation_gap"] = opt["log_px"] - opt["optimized_elbo"]
            tick(B * evidence_samples)
    per["amortization_gap"] = [opt["optimized_elbo"] - e for e in per["elbo"]]
    lp = opt.get("log_px", torch.full_like(per["elbo"][0], float("nan")))
    per["inference_gap"] = [lp - e for e in per["elbo"]]
    out = {k: torch.stack(v).cpu() for k, v in per.items()}              # [L, B]
    out.update({k: table.get(k, nan) for k in METRICS if k not in OWN})  # [L, B]; NaN without masks
    out.update({k: v.cpu() for k, v in opt.items()})                     # [B]
    out["cpu_seconds"] = torch.full((x.shape[0],), cpu, dtype=torch.float64)
    return out


def _chunk(x: torch.Tensor, num_slots: int) -> int:
    """Samples per decoder call: `PIXEL_BUDGET` slot-pixels of all the batch's images."""
    return max(1, PIXEL_BUDGET // (x.shape[0] * num_slots * x.shape[-2] * x.shape[-1]))


@contextlib.contextmanager
def _decoder_fixed(system: Iodine):
    """The system's parameters take no gradient (q* is fitted against a fixed decoder)."""
    params = list(system.parameters())
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def _run_name(run: Run, taken: set[str]) -> str:
    base = run.name
    name, i = base or "run", 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def compare(runs: Sequence[Run | str | Path], *, num_images: int = 64, num_iters: int | None = None,
            num_slots: int | None = None, iw_samples: int = 16, evidence_samples: int = 1000,
            gap_steps: int = 1000, gap_lr: float = 0.01, gap_check_every: int = 25, gap_patience: int = 4,
            generalize: bool = True, time_limit: float | None = None, seed: int = 0,
            data: str | Path | Mapping[str, torch.Tensor] | None = None, batch_size: int = 16,
            merge: int = 1, device: str = "cpu", amp: bool | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Evaluate the guides of several runs on the same images (see the module docstring).

    Args:
        runs: `Run`s, or what `Run.open` takes (run directories, checkpoint files,
            ``pretrained:NAME``); their image shapes must agree.
        num_images: images (scenes, after merging) to evaluate.
        num_iters: decoder passes of guides that refine (default: each run's trained
            number; more looks beyond it, fewer stops early); a one-shot guide takes one.
        num_slots: K at test time (guides that can change K; others refuse another K).
        iw_samples: samples of every per-step ELBO / IWAE estimate.
        evidence_samples: S, importance samples of log p(x) (0: none, and no k-hat).
        gap_steps, gap_lr, gap_check_every, gap_patience: q*'s step cap, learning rate and
            stopping rule (`fit_gaussian`).
        generalize: also score each guide on scenes merged from twice as many images, at
            its K and, for guides that can change K, at 2K - 1 slots (cheap estimators only).
        time_limit: seconds the whole comparison should take, or None; above it S, the
            q* cap and the per-step samples are lowered together (`plan`), never below
            32, 50 and 4, then q* and the generalisation run on fewer images (whole
            batches), and the report says so.
        seed: seeds the refinement and every estimate (the same for every run).
        data: stored dataset, in-memory dict (``image``, ``mask``) or None (first run's).
        batch_size: images per batch.
        merge: source images merged into each scene (`merge_scenes`); 1 leaves them alone.
        amp: the networks in bf16 autocast (`Run.set_precision`); None leaves `Run`s as they
            are and opens paths in float32.
        progress: a progress bar over all runs with an estimate of the time left.
    Returns:
        ``{"settings": {...}, "runs": {name: {...}}}``: per run the lists over steps 1..L of
        every metric in `METRICS` and their standard errors (``elbo_se``, ...),
        ``trained_step``, ``final_step``, the q* values (``optimized_*``, per start
        ``*_from_guide`` / ``*_from_prior``, its steps), ``log_px``, ``approximation_gap``,
        ``khat`` (each with ``_se``), the cost (``decoder_passes``, ``cpu_seconds``),
        ``generalization`` and ``final`` (every metric at the final step).
    """
    _check_request(runs, num_images=num_images, iw_samples=iw_samples, batch_size=batch_size, merge=merge,
                   gap_check_every=gap_check_every, gap_patience=gap_patience, gap_steps=gap_steps,
                   gap_lr=gap_lr, evidence_samples=evidence_samples, num_iters=num_iters, num_slots=num_slots)
    opened = _open_runs(runs, device, amp, num_slots=num_slots, num_iters=num_iters, batch_size=batch_size)
    x_all, m_all, where, background, objects = _images(opened, data, num_images, merge, device)
    N = x_all.shape[0]
    est = dict(iw_samples=iw_samples, evidence_samples=evidence_samples, gap_steps=gap_steps)
    plans, planned, reduced, rates, seconds = _plan_runs(opened, x_all, est, num_iters=num_iters,
                                                         num_slots=num_slots, gap_check_every=gap_check_every,
                                                         generalize=generalize, time_limit=time_limit,
                                                         batch_size=batch_size)
    settings = {"num_images": N, "data": where, "merge_scenes": merge, "objects_per_image": objects,
                "background_groups": background, "num_iters": num_iters, "num_slots": num_slots,
                **est, "gap_lr": gap_lr, "gap_check_every": gap_check_every, "gap_patience": gap_patience,
                "seed": seed, "batch_size": batch_size, "time_limit": time_limit,
                "planned_seconds": planned, "reduced_for_time": reduced, "decoders": DECODERS,
                "precision": ", ".join(sorted({run.system.precision for run in opened}))}
    iw_samples, evidence_samples, gap_steps = est["iw_samples"], est["evidence_samples"], est["gap_steps"]
    gap_images = est["gap_images"]
    # the bar counts planned seconds: each run's work in decodings, at its measured rate
    bar = tqdm(total=round(sum(seconds), 1), disable=not progress, desc="compare", dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    results: dict[str, Any] = {}
    for (run, iters, L), rate in zip(plans, rates):
        tick = lambda n, rate=rate: bar.update(n * rate)
        name = _run_name(run, set(results))
        system, cfg = run.system, run.cfg
        trained = len(system.weights()) if system.guide.refines else 1
        bar.set_postfix_str(name)
        log.info("comparing %s (%s guide) on %d images", name, cfg.guide.kind, N)
        options = dict(num_iters=iters, iw_samples=iw_samples, gap_lr=gap_lr, gap_check_every=gap_check_every,
                       gap_patience=gap_patience, background=background)
        joined = _batches(system, x_all, m_all, batch_size, seed, gap_images, num_slots=num_slots,
                          gap_steps=gap_steps, evidence_samples=evidence_samples, tick=tick, **options)
        result = _summary(run, joined, L, trained, gap_steps=gap_steps, gap_images=gap_images,
                          num_slots=num_slots)
        if generalize:
            result["generalization"] = _generalization(run, data, gap_images, merge, batch_size, seed,
                                                       tick=tick, **{**options, "num_iters": iters})
        results[name] = result
    bar.close()
    return {"settings": settings, "runs": results}


def _images(opened: list[Run], data, num_images: int, merge: int, device: str):
    """The images every run is compared on (the first run's, or `data`), checked against
    every run: (images [N, C, H, W], masks [N, G, H, W] or None, where they come from, the
    background groups, the mean number of objects per image)."""
    batch, where, background = load_images_for(opened[0], data, num_images, merge)
    x_all = batch["image"][:num_images].to(device)
    m_all = batch["mask"][:num_images].to(device) if "mask" in batch else None
    for run in opened:
        try:
            run.system.check_batch(x_all[:1])
        except ValueError as e:
            raise ValueError(f"{run.ref}: {e}") from None
    objects = float((m_all[:, background:].flatten(2).amax(2) > 0).sum(1).double().mean()) \
        if m_all is not None else None
    return x_all, m_all, where, background, objects


def _plan_runs(opened: list[Run], x_all: torch.Tensor, est: dict[str, int], *, num_iters: int | None,
               num_slots: int | None, gap_check_every: int, generalize: bool, time_limit: float | None,
               batch_size: int):
    """Each run's (run, num_iters, decoder passes L); the settings in `est` lowered to fit
    the time limit (`plan`, in place); and each run's planned seconds at its measured rate."""
    plans = []
    for run in opened:
        iters = num_iters if run.system.guide.refines else None
        plans.append((run, iters, len(run.system.weights(iters))))
    N = x_all.shape[0]
    planned, reduced, rates = plan(plans, N, num_slots, est, gap_check_every, generalize, time_limit, x_all,
                                   batch_size)
    if time_limit is not None and planned > time_limit:
        log.warning("compare: even at its lowest settings this comparison needs about %.0f s, more than the "
                    "time limit of %.0f s; lower `num_images` or leave out the generalisation", planned, time_limit)
    seconds = []
    for (r, _, L), rate in zip(plans, rates):
        every, subset = work(L, r.system.guide.can_change_slots, est["iw_samples"], est["evidence_samples"],
                             est["gap_steps"], gap_check_every, generalize)
        seconds.append(rate * (N * every + est["gap_images"] * subset))
    return plans, planned, reduced, rates, seconds


def _check_request(runs, *, num_images: int, iw_samples: int, batch_size: int, merge: int, gap_check_every: int,
                   gap_patience: int, gap_steps: int, gap_lr: float, evidence_samples: int,
                   num_iters: int | None, num_slots: int | None) -> None:
    """`compare`'s arguments checked before any run is opened (errors name the parameter)."""
    if not runs:
        raise ValueError("give at least one run directory")
    for name, value in [("num_images", num_images), ("iw_samples", iw_samples),
                        ("batch_size", batch_size), ("merge", merge),
                        ("gap_check_every", gap_check_every), ("gap_patience", gap_patience)]:
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1, got {value}")
    if gap_steps < 0 or not gap_lr > 0 or evidence_samples < 0:
        raise ValueError(f"`gap_steps` and `evidence_samples` must be >= 0 and `gap_lr` > 0, "
                         f"got {gap_steps}, {evidence_samples} and {gap_lr}")
    for name, value in [("num_iters", num_iters), ("num_slots", num_slots)]:
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be at least 1, got {value}")


def _open_runs(runs, device: str, amp: bool | None, *, num_slots: int | None, num_iters: int | None,
               batch_size: int) -> list[Run]:
    """Every run opened and checked (its K, the memory it needs) before any work."""
    opened = []
    for run in runs:
        run = Run.of(run, device, amp)
        try:
            check_slots(run.system, num_slots)
        except ValueError as e:
            raise ValueError(f"{run.ref}: {e}") from None
        check_memory(run.cfg, run.device, batch=batch_size, num_slots=num_slots, num_iters=num_iters,
                     training=False, what="compare")
        opened.append(run)
    return opened


def _summary(run: Run, joined: dict[str, torch.Tensor], L: int, trained: int, *, gap_steps: int,
             gap_images: int, num_slots: int | None) -> dict[str, Any]:
    """One run's entry of the result: per-step means and standard errors of every metric,
    the per-image estimates summarised (k-hat by its median and the share above 0.7), q*'s
    convergence, the final step, the cost, and what the run is."""
    system, cfg = run.system, run.cfg
    result: dict[str, Any] = {k: [metrics.summarize(row) for row in joined[k]] for k in METRICS}
    result.update({f"{k}_se": [mean_and_se(row)[1] for row in joined[k]] for k in METRICS})
    for k in joined:
        if joined[k].dim() == 1 and k != "cpu_seconds":
            result[k], result[f"{k}_se"] = mean_and_se(joined[k])
    if "khat" in joined:                       # heavy-tailed: the median and the share above 0.7
        result.pop("khat_se")
        result["khat"] = float(joined["khat"].median())
        result["khat_above_0.7"] = float((joined["khat"] > 0.7).double().mean())
        result["khat_per_image"] = [round(float(k), 3) if math.isfinite(k) else None for k in joined["khat"]]
    for start in ("guide", "prior"):
        took = joined[f"gap_steps_from_{start}"][:gap_images]
        result[f"gap_converged_from_{start}"] = float((took < gap_steps).double().mean()) if gap_steps else 0.0
    final = min(trained, L)
    result["final"] = {k: result[k][final - 1] for k in METRICS}
    result["decoder_passes"] = list(range(1, L + 1))
    cpu = float(joined["cpu_seconds"].mean())
    result["cpu_seconds"] = [cpu * t / L for t in range(1, L + 1)]   # the inference's CPU time, spread evenly
    result.update(run_dir=run.ref, guide=cfg.guide.kind, dataset=cfg.dataset, preset=cfg.preset,
                  checkpoint_step=run.step, trained_num_iters=trained if system.guide.refines else 0,
                  trained_num_slots=cfg.model.num_slots, num_slots=num_slots or cfg.model.num_slots,
                  steps=L, trained_step=trained, final_step=final, can_change_slots=system.guide.can_change_slots)
    return result


DECODERS = ("each guide is scored with the decoder it was trained with: the generator adapts to its "
            "guide, so the gaps measure each guide against its own model, and a guide's log p(x) is "
            "its model's evidence, not a common yardstick")


def _batches(system: Iodine, x_all, m_all, batch_size: int, seed: int, gap_images: int | None = None,
             **options) -> dict[str, torch.Tensor]:
    """`evaluate_guide` over the images in batches, seeded: {metric: [L, N] or [N]}. q* is
    fitted on the first `gap_images` images (default all); its values are NaN for the rest."""
    parts: list[dict[str, torch.Tensor]] = []
    with pyro.get_param_store().scope(), seeded(seed, x_all):
        for start in range(0, x_all.shape[0], batch_size):
            stop = min(start + batch_size, x_all.shape[0])
            without = gap_images is not None and start >= gap_images
            part = evaluate_guide(system, x_all[start:stop], m_all[start:stop] if m_all is not None else None,
                                  **{**options, **({"gap_steps": 0} if without else {})})
            if without:
                part.update({k: torch.full_like(v, float("nan")) for k, v in part.items() if k.startswith(Q_STAR)})
            parts.append(part)
    return {k: torch.cat([p[k] for p in parts], -1) for k in parts[0]}


Q_STAR = ("optimized_", "gap_steps_from_", "approximation_gap", "amortization_gap")   # what needs q*


def _generalization(run: Run, data, num_images: int, merge: int, batch_size: int, seed: int, *,
                    tick=None, **options) -> dict[str, Any]:
    """Final-step ELBO, IWAE, MSE, FG-ARI and ARI (with standard errors) on scenes merged
    from twice as many images, at the trained K and (guides that can change K) 2K - 1."""
    try:
        batch, _, background = load_images_for(run, data, num_images, 2 * merge)
    except ValueError as e:
        return {"skipped": str(e)}
    x, masks = batch["image"][:num_images].to(run.device), batch["mask"][:num_images].to(run.device)
    K = run.cfg.model.num_slots
    objects = float((masks[:, background:].flatten(2).amax(2) > 0).sum(1).double().mean())
    out: dict[str, Any] = {"merge_scenes": 2 * merge, "objects_per_image": objects}
    for slots in ([K, 2 * K - 1] if run.system.guide.can_change_slots else [K]):
        joined = _batches(run.system, x, masks, batch_size, seed, num_slots=slots, gap_steps=0,
                          evidence_samples=0, tick=tick, **{**options, "background": background})
        row = {}
        for k in ("elbo", "iwae", "mse", "fg_ari", "ari"):
            row[k], row[f"{k}_se"] = mean_and_se(joined[k][-1])
        out[f"K={slots}"] = row
    return out


GUIDE_PASS = 3               # decodings' worth of one guide step (decoder, refinement network, gradient inputs)


def step_cost(iw_samples: int) -> int:
    """Decodings of one image's slots per guide step scored: its ELBO / IWAE samples, and
    the guide's own pass (`GUIDE_PASS`)."""
    return iw_samples + GUIDE_PASS


def work(L: int, can_change_slots: bool, iw: int, S: int, G: int, check_every: int,
         generalize: bool) -> tuple[int, int]:
    """A run's work in decodings of one image's slots: (per image, and in addition per
    image of the q* subset), as `evaluate_guide` reports it. Every image: L scored steps, S
    samples of log p(x) and the ELBO / IWAE of both starts of q*; each q* image: the two
    starts' `fit_cost` and, when generalising, the same scoring at each K tried."""
    scored = L * step_cost(iw) + 2 * iw
    every = scored + S
    subset = 2 * fit_cost(G, check_every) + (scored * (1 + can_change_slots) if generalize else 0)
    return every, subset


def plan(plans, num_images: int, num_slots: int | None, est: dict[str, int], check_every: int,
         generalize: bool, time_limit: float | None, x: torch.Tensor,
         batch_size: int) -> tuple[float, bool, list[float]]:
    """The seconds the comparison is expected to take, from one timed decoder call per
    run; whether `est` (iw_samples, evidence_samples, gap_steps, gap_images; changed in
    place) was lowered to fit `time_limit`; and each run's seconds per decoding of one
    image's slots (the rate that turns `work` into seconds).

    First iw, S and the q* cap are scaled by one factor, with floors of 4, 32 and 50; if
    that is not enough, q* and the generalisation run on fewer images (whole batches, at
    least one)."""
    rates = []
    for run, _, L in plans:
        K = num_slots or run.cfg.model.num_slots
        z = torch.zeros(16, K, run.cfg.model.latent_dim, device=x.device)
        with torch.no_grad():
            run.system.model.decode(z)                                    # warm-up
            t0 = time.perf_counter()
            run.system.model.decode(z)
        rates.append((time.perf_counter() - t0) / 16)                     # seconds per image's slots

    def parts(iw, S, G):                                                  # seconds: all images, per subset image
        costs = [(rate, work(L, run.system.guide.can_change_slots, iw, S, G, check_every, generalize))
                 for (run, _, L), rate in zip(plans, rates)]
        return sum(r * every for r, (every, _) in costs) * num_images, sum(r * sub for r, (_, sub) in costs)

    def seconds(iw, S, G, M=num_images):
        every, subset = parts(iw, S, G)
        return every + M * subset

    iw, S, G = est["iw_samples"], est["evidence_samples"], est["gap_steps"]
    est["gap_images"] = num_images
    need = seconds(iw, S, G)
    if time_limit is None or need <= time_limit:
        return need, False, rates
    lo, hi = 0.0, 1.0
    for _ in range(30):                                                   # bisect the common factor
        f = (lo + hi) / 2
        lo, hi = (f, hi) if seconds(*_scaled(f, iw, S, G)) <= time_limit else (lo, f)
    est["iw_samples"], est["evidence_samples"], est["gap_steps"] = scaled = _scaled(lo, iw, S, G)
    if seconds(*scaled) > time_limit:                                     # the floors: fewer q* images
        every, subset = parts(*scaled)
        fit = int((time_limit - every) / subset) if subset > 0 else num_images
        est["gap_images"] = min(num_images, max(batch_size, fit // batch_size * batch_size))
    return seconds(*scaled, est["gap_images"]), True, rates


def _scaled(f: float, iw: int, S: int, G: int) -> tuple[int, int, int]:
    return (max(min(iw, 4), int(iw * f)), max(min(S, 32), int(S * f)), max(min(G, 50), int(G * f)))
