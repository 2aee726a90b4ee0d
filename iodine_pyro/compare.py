"""Compare guides on the same images, each against its own decoder (docs/comparison.md).

Per guide and step t (t = 1..L decoder passes), in nats per image with standard errors
over images:

* ELBO_t = E_{q_t}[log p(x | z)] - KL(q_t || p) (S' = ``iw_samples`` samples, closed-form
  KL, as training's `TraceMeanField_ELBO`), NLL, KL, and IWAE_t = log (1/S') sum_s
  p(x, z_s) / q_t(z_s), from Pyro traces of the proposal and the replayed model.
* log p(x): importance sampling with the guide's posterior at the trained step as
  proposal, S = ``evidence_samples``, the per-image log-mean-exp computed directly; the
  Pareto k-hat of the weights (PSIS, ArviZ) says how far the proposal is from the
  posterior (Yao et al., 2018).
* q*: a per-image diagonal Gaussian fitted to the image's ELBO with the decoder fixed,
  from the guide's posterior and from the prior, until a stopping rule says it has
  converged (`fit_gaussian`); per image the better of the two.
* Cremer et al. (2018): approximation gap log p(x) - ELBO(q*), amortization gap
  ELBO(q*) - ELBO_t, inference gap log p(x) - ELBO_t.
* MSE, FG-ARI, ARI of the step's own sample, exactly as ``evaluate`` reports them; the
  cost (decoder passes, CPU seconds per image); generalisation to scenes with more
  objects and, for guides that can change it, another K.

The estimators are functions of a log-joint and a proposal, checked on a linear-Gaussian
model with exact answers (tests/analysis/test_protocol.py). Each guide was trained with its own
decoder, which adapted to it: the gaps say how well a guide serves its own model.

`merge_scenes` builds scenes with more objects than training (for the generalisation
experiment) from a stored dataset with a uniform background, such as Tetrominoes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence
from tqdm.auto import tqdm

from . import metrics
from .memory import check_memory
from .data import load_images
from .evaluate import METRICS as TABLE
from .evaluate import score_steps
from .models.generative import site_plates, step_scale
from .posterior import check_slots, rng_devices
from .run import IMAGES, Run
from .system import Iodine

log = logging.getLogger(__name__)

__all__ = ["compare", "importance_terms", "optimize_posterior", "merge_scenes", "load_images_for",
           "write_report", "markdown_table", "importance_log_weights", "log_mean_exp", "mean_and_se",
           "pareto_khat", "gaussian_elbo", "fit_gaussian", "decomposition", "model_log_joint"]

OWN = ("elbo", "iwae", "nll", "kl", "amortization_gap", "inference_gap")   # this module's estimators
GAPS = ("amortization_gap", "inference_gap")
# ... and every per-image metric of the evaluation table that they do not define
METRICS = OWN + tuple(k for k in TABLE if k not in OWN and k != "pred_nll")
PIXEL_BUDGET = 2 ** 21        # decoded slot-pixels per decoder call when scoring samples


# -- the estimators: functions of a log-joint and a proposal ---------------------------------
# A log-joint is a function z [n, B, *event] -> log p(x_b, z) [n, B] of each image b's own
# latents; a proposal is a torch Normal with batch shape [B, *event]. The same functions
# estimate IODINE's model (`model_log_joint`) and the linear-Gaussian model of the tests,
# whose log p(x) and posterior are exact.
def _event_sum(v: torch.Tensor, q: Normal) -> torch.Tensor:
    return v.flatten(v.dim() - q.loc.dim() + 1).sum(-1)               # [..., B]


def importance_log_weights(log_joint, q: Normal, num_samples: int, chunk: int = 256) -> torch.Tensor:
    """log p(x, z_s) - log q(z_s) for S samples z_s ~ q, `chunk` samples per call of
    `log_joint`: [S, B]."""
    out = []
    for s0 in range(0, num_samples, chunk):
        z = q.sample((min(chunk, num_samples - s0),))                   # [n, B, *event]
        out.append(log_joint(z) - _event_sum(q.log_prob(z), q))         # [n, B]
    return torch.cat(out)


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/S) sum_s exp(log_w[s]) per image, computed directly: [S, B] -> [B]."""
    return torch.logsumexp(log_w.double(), 0) - math.log(log_w.shape[0])


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean over images and its standard error (sample std / sqrt(n); NaN for n < 2)."""
    v = values.detach().double().flatten()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")


def pareto_khat(log_w: torch.Tensor) -> torch.Tensor:
    """The Pareto k-hat of each image's importance weights (PSIS, `arviz.psislw`), [S, B]
    -> [B]: below 0.5 the proposal is close to the posterior, above 0.7 the importance
    estimate is unreliable (Yao et al., 2018)."""
    import warnings

    import arviz

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = arviz.psislw(log_w.detach().double().T.cpu().numpy())
    return torch.as_tensor(k, dtype=torch.float64).reshape(log_w.shape[1])


def gaussian_elbo(log_joint, q: Normal, num_samples: int, chunk: int = 256) -> torch.Tensor:
    """E_q[log p(x, z) - log q(z)] per image over S reparameterised samples: [B]. The mean
    of the log importance weights (whose log-mean-exp is the IWAE): exact at any S when q
    is the posterior."""
    total = 0.0
    for s0 in range(0, num_samples, chunk):
        z = q.rsample((min(chunk, num_samples - s0),))                  # [n, B, *event]
        total = total + (log_joint(z) - _event_sum(q.log_prob(z), q)).sum(0)   # [B]
    return total / num_samples


def fit_gaussian(log_joint, q0: Normal, *, lr: float = 0.01, check_every: int = 25, patience: int = 4,
                 max_steps: int = 1000, check_samples: int = 16, tol: float = 0.01,
                 tick=None) -> tuple[Normal, torch.Tensor]:
    """q*: a per-image diagonal Gaussian fitted to each image's ELBO, from `q0`.

    Adam on the reparameterised one-sample ELBO (`gaussian_elbo`). Every `check_every`
    steps each image's ELBO is estimated with the same `check_samples` standard-normal
    draws each time (common random numbers, so that two checks differ by the fit, not by
    their noise); an image has converged once `patience` checks in a row have not improved
    its best by `tol` nats (Cremer et al., 2018: checks every 100 steps, 10 of them, lr
    1e-3), and the fit stops when every image has, or after `max_steps`. The images share
    the loss but not their parameters, and Adam's steps are per element, so each image is
    fitted on its own. `tick(n)` reports its work in evaluations of one image's log-joint
    (`fit_cost`): after every step, and when it stops early, the rest of what it could
    have taken, so that a run's reported work does not depend on when it converges.

    Returns:
        (q*, each image's parameters at its best check; the steps each image took to its
        last improving check plus its patience, [B], the cap where it never converged)
    """
    loc = q0.loc.detach().clone().requires_grad_()
    raw = _inverse_softplus(q0.scale.detach()).clone().requires_grad_()
    optimizer = torch.optim.Adam([loc, raw], lr=lr)
    eps = torch.randn(check_samples, *loc.shape, dtype=loc.dtype, device=loc.device)   # [n, B, *event]
    B = loc.shape[0]

    @torch.no_grad()
    def check() -> torch.Tensor:                                        # [B]
        q = Normal(loc, F.softplus(raw))
        z = q.loc + eps * q.scale                                       # [n, B, *event]
        return (log_joint(z) - _event_sum(q.log_prob(z), q)).mean(0)

    best, bad = check(), torch.zeros(B, dtype=torch.long, device=loc.device)
    best_loc, best_raw = loc.detach().clone(), raw.detach().clone()
    steps = torch.full((B,), max_steps, dtype=torch.long, device=loc.device)
    step = 0
    with torch.enable_grad():
        while step < max_steps and bool((bad < patience).any()):
            optimizer.zero_grad()
            (-gaussian_elbo(log_joint, Normal(loc, F.softplus(raw)), 1).sum()).backward()
            optimizer.step()
            step += 1
            if tick is not None:
                tick(B * (FIT_STEP + (check_samples if step % check_every == 0 else 0)))
            if step % check_every == 0:
                value, live = check(), bad < patience
                better = live & (value > best + tol)
                view = (-1,) + (1,) * (loc.dim() - 1)
                best_loc = torch.where(better.view(view), loc.detach(), best_loc)
                best_raw = torch.where(better.view(view), raw.detach(), best_raw)
                best = torch.where(better, value, best)
                bad = torch.where(better, 0, bad + live.long())
                steps = torch.where(live & (bad >= patience), step, steps)
    if tick is not None and step < max_steps:                           # stopped early: the rest
        tick(B * (fit_cost(max_steps, check_every, check_samples) - fit_cost(step, check_every, check_samples)))
    return Normal(best_loc, F.softplus(best_raw)), steps


FIT_STEP = 4                  # log-joint evaluations of one image per Adam step (forward and backward)


def fit_cost(steps: int, check_every: int, check_samples: int = 16) -> int:
    """Work of `fit_gaussian` on one image over `steps` steps, in log-joint evaluations."""
    return FIT_STEP * steps + check_samples * (steps // check_every)


def decomposition(log_px: torch.Tensor, elbo_star: torch.Tensor, elbo_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cremer et al.'s split of the inference gap log p(x) - ELBO(q), per image: the
    approximation gap log p(x) - ELBO(q*) plus the amortization gap ELBO(q*) - ELBO(q)."""
    return {"inference_gap": log_px - elbo_q, "approximation_gap": log_px - elbo_star,
            "amortization_gap": elbo_star - elbo_q}


def model_log_joint(system: Iodine, x: torch.Tensor):
    """log p(x_b, z) of IODINE's model as a function of z [n, B, K, n_z] -> [n, B]: one
    decoder call per chunk of n samples x B images x K slots (prior plus the pixel
    mixture's likelihood, as the model's sites ``t0/z`` and ``t0/x`` score them)."""
    model = system.model

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        n, B, K, D = z.shape
        flat = z.reshape(n * B, K, D)                                  # [n*B, K, n_z]
        xs = x.repeat(n, 1, 1, 1)                                       # [n*B, C, H, W]
        lp_x = model.likelihood(model.decode(flat)).log_prob(xs)        # [n*B]
        lp_z = model.prior(n * B, K, like=x).log_prob(flat).sum((1, 2))   # [n*B]
        return (lp_x + lp_z).view(n, B)

    return log_joint

def _proposal(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
    """A mean-field Gaussian over the one-step model's latent site ``t0/z``."""
    B, K = loc.shape[:2]
    plates = site_plates(B, K)
    with plates.images, plates.slots, step_scale(1.0, B):
        pyro.sample("t0/z", dist.Normal(loc, scale).to_event(1))      # [B, K, n_z]


def _site_log_prob(trace, name: str) -> torch.Tensor:
    """Unscaled log density of one site, per image (summed over slots): [B]."""
    site = trace.nodes[name]
    return site["fn"].log_prob(site["value"]).flatten(1).sum(1)


@torch.no_grad()
def importance_terms(system: Iodine, x: torch.Tensor, q: Normal,
                     num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x, z_s) - log q(z_s) and log p(x | z_s) for S samples z_s ~ q, per image.

    The samples of all images are drawn in one plate of size n*B (n samples at a time) so
    that the model's decoder sees [n*B, K, n_z] as usual.

    Args:
        x: [B, C, H, W]; q: batch shape [B, K, n_z].
    Returns:
        (log_w, log_lik), each [S, B].
    """
    B, K = q.loc.shape[:2]
    H, W = x.shape[-2:]
    chunk = max(1, PIXEL_BUDGET // (B * K * H * W))
    log_w, log_lik = [], []
    model = system.model
    for s0 in range(0, num_samples, chunk):
        n = min(chunk, num_samples - s0)
        xs = x.repeat(n, 1, 1, 1)                                        # [n*B, C, H, W]
        loc, scale = q.loc.repeat(n, 1, 1), q.scale.repeat(n, 1, 1)     # [n*B, K, n_z]
        guide_tr = poutine.trace(_proposal).get_trace(xs, loc, scale)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
            xs, None, num_slots=K)
        lp_z = _site_log_prob(model_tr, "t0/z")                         # [n*B]
        lp_x = _site_log_prob(model_tr, "t0/x")                         # [n*B]
        lq_z = _site_log_prob(guide_tr, "t0/z")                         # [n*B]
        log_w.append((lp_z + lp_x - lq_z).view(n, B))
        log_lik.append(lp_x.view(n, B))
    return torch.cat(log_w), torch.cat(log_lik)                         # [S, B] each


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(min=1e-6)
    return y + torch.log(-torch.expm1(-y))


def optimize_posterior(system: Iodine, x: torch.Tensor, q0: Normal, *, steps: int = 200,
                       lr: float = 0.01, tick=None) -> Normal:
    """A per-image mean-field Gaussian q*(z) [B, K, n_z] fitted to each image's ELBO.

    Initialised at `q0` (the guide's posterior); Adam on Pyro's `TraceMeanField_ELBO` of
    the one-step model (one sample per step, closed-form KL) with the decoder's parameters
    frozen. The batch's images share the loss but not their parameters, and Adam's updates
    are per element, so every image is optimised on its own. `tick()` is called after every
    step (progress).
    """
    loc = q0.loc.detach().clone().requires_grad_()                        # [B, K, n_z]
    raw = _inverse_softplus(q0.scale.detach()).clone().requires_grad_()   # [B, K, n_z]
    K = loc.shape[1]

    def guide(x, weights=None, batch_size=None, num_slots=None):
        _proposal(x, loc, F.softplus(raw))

    model = poutine.block(system.model, hide_types=["param"])
    elbo = TraceMeanField_ELBO()
    optimizer = torch.optim.Adam([loc, raw], lr=lr)
    params = list(system.parameters())
    was = [p.requires_grad for p in params]
    try:
        for p in params:                                                  # the decoder stays fixed
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = elbo.differentiable_loss(model, guide, x, None, num_slots=K)
                loss.backward()
                optimizer.step()
                if tick is not None:
                    tick()
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return Normal(loc.detach(), F.softplus(raw).detach())


def _elbo_iwae(system: Iodine, x: torch.Tensor, q: Normal, num_samples: int) -> dict[str, torch.Tensor]:
    """Per-image ELBO, IWAE, NLL and KL of posterior q (see the module docstring): each [B]."""
    log_w, log_lik = importance_terms(system, x, q, num_samples)         # [S, B] each
    prior = system.model.prior(x.shape[0], q.loc.shape[1], like=x)
    kl = kl_divergence(q, prior).sum((1, 2))                             # [B]
    nll = -log_lik.mean(0)                                               # [B]
    iwae = torch.logsumexp(log_w, 0) - math.log(num_samples)             # [B]
    return {"elbo": -(nll + kl), "iwae": iwae, "nll": nll, "kl": kl}


# -- the images -----------------------------------------------------------------------------
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


# -- one guide ------------------------------------------------------------------------------
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
            merge: int = 1, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
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
        progress: a progress bar over all runs with an estimate of the time left.
    Returns:
        ``{"settings": {...}, "runs": {name: {...}}}``: per run the lists over steps 1..L of
        every metric in `METRICS` and their standard errors (``elbo_se``, ...),
        ``trained_step``, ``final_step``, the q* values (``optimized_*``, per start
        ``*_from_guide`` / ``*_from_prior``, its steps), ``log_px``, ``approximation_gap``,
        ``khat`` (each with ``_se``), the cost (``decoder_passes``, ``cpu_seconds``),
        ``generalization`` and ``final`` (every metric at the final step).
    """
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
    opened = []
    for run in runs:                               # open (and check) every run before any work
        run = run if isinstance(run, Run) else Run.open(run, device)
        try:
            check_slots(run.system, num_slots)
        except ValueError as e:
            raise ValueError(f"{run.ref}: {e}") from None
        check_memory(run.cfg, run.device, batch=batch_size, num_slots=num_slots, num_iters=num_iters,
                     training=False, what="compare")
        opened.append(run)
    batch, where, background = load_images_for(opened[0], data, num_images, merge)
    x_all = batch["image"][:num_images].to(device)                        # [N, C, H, W]
    m_all = batch["mask"][:num_images].to(device) if "mask" in batch else None   # [N, G, H, W]
    N = x_all.shape[0]
    objects = float((m_all[:, background:].flatten(2).amax(2) > 0).sum(1).double().mean()) \
        if m_all is not None else None
    plans = []
    for run in opened:
        refines = run.system.guide.refines
        iters = num_iters if refines else None
        L = len(run.system.weights(iters))
        plans.append((run, iters, L))
    est = dict(iw_samples=iw_samples, evidence_samples=evidence_samples, gap_steps=gap_steps)
    planned, reduced, rates = plan(plans, N, num_slots, est, gap_check_every, generalize, time_limit, x_all,
                                   batch_size)
    if time_limit is not None and planned > time_limit:
        log.warning("compare: even at its lowest settings this comparison needs about %.0f s, more than the "
                    "time limit of %.0f s; lower `num_images` or leave out the generalisation", planned, time_limit)
    settings = {"num_images": N, "data": where, "merge_scenes": merge, "objects_per_image": objects,
                "background_groups": background, "num_iters": num_iters, "num_slots": num_slots,
                **est, "gap_lr": gap_lr, "gap_check_every": gap_check_every, "gap_patience": gap_patience,
                "seed": seed, "batch_size": batch_size, "time_limit": time_limit,
                "planned_seconds": planned, "reduced_for_time": reduced, "decoders": DECODERS}
    iw_samples, evidence_samples, gap_steps = est["iw_samples"], est["evidence_samples"], est["gap_steps"]
    gap_images = est["gap_images"]
    seconds = []                                                          # each run's planned seconds
    for (r, _, L), rate in zip(plans, rates):
        every, subset = work(L, r.system.guide.can_change_slots, iw_samples, evidence_samples, gap_steps,
                             gap_check_every, generalize)
        seconds.append(rate * (N * every + gap_images * subset))
    # the bar counts planned seconds: each run's work in decodings, at its measured rate
    bar = tqdm(total=round(sum(seconds), 1), disable=not progress, desc="compare", dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    results: dict[str, Any] = {}
    for (run, iters, L), rate in zip(plans, rates):
        tick = lambda n, rate=rate: bar.update(n * rate)
        name = _run_name(run, set(results))
        system, cfg = run.system, run.cfg
        try:
            system.check_batch(x_all[:1])
        except ValueError as e:
            raise ValueError(f"{run.ref}: {e}") from None
        trained = len(system.weights()) if system.guide.refines else 1
        bar.set_postfix_str(name)
        log.info("comparing %s (%s guide) on %d images", name, cfg.guide.kind, N)
        options = dict(num_iters=iters, iw_samples=iw_samples, gap_lr=gap_lr, gap_check_every=gap_check_every,
                       gap_patience=gap_patience, background=background)
        joined = _batches(system, x_all, m_all, batch_size, seed, gap_images, num_slots=num_slots,
                          gap_steps=gap_steps, evidence_samples=evidence_samples, tick=tick, **options)
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
        if generalize:
            result["generalization"] = _generalization(run, data, gap_images, merge, batch_size, seed,
                                                       tick=tick, **{**options, "num_iters": iters})
        results[name] = result
    bar.close()
    return {"settings": settings, "runs": results}


DECODERS = ("each guide is scored with the decoder it was trained with: the generator adapts to its "
            "guide, so the gaps measure each guide against its own model, and a guide's log p(x) is "
            "its model's evidence, not a common yardstick")


def _batches(system: Iodine, x_all, m_all, batch_size: int, seed: int, gap_images: int | None = None,
             **options) -> dict[str, torch.Tensor]:
    """`evaluate_guide` over the images in batches, seeded: {metric: [L, N] or [N]}. q* is
    fitted on the first `gap_images` images (default all); its values are NaN for the rest."""
    parts: list[dict[str, torch.Tensor]] = []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=rng_devices(x_all)):
        torch.manual_seed(seed)
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


# -- the report -----------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pm(r: dict[str, Any], key: str, spec: str, t: int | None = None) -> str:
    """A mean with its standard error, from ``r[key]`` and ``r[key + "_se"]`` (at step t)."""
    v, se = r.get(key), r.get(f"{key}_se")
    if t is not None:
        v, se = (v[t] if v is not None else None), (se[t] if se is not None else None)
    text = _fmt(v, spec)
    return text if text == "n/a" or se is None or math.isnan(se) else f"{text} ± {format(se, spec)}"


def markdown_table(result: dict[str, Any]) -> str:
    """The summary at each run's trained step (means ± standard errors over images), the
    protocol's settings, generalisation, and per-step tables of guides with several steps."""
    s = result["settings"]
    S = s.get("evidence_samples", 0)
    lines = [f"# Guide comparison on {s['num_images']} images of {s['data']}", "",
             f"Decoder fixed per model: {s.get('decoders', DECODERS)}.", "",
             f"log p(x): importance sampling with the guide's posterior as proposal, S = {S}; per-step "
             f"ELBO and IWAE with {s['iw_samples']} samples; q*: a per-image diagonal Gaussian fitted "
             f"from the guide's posterior and from the prior (the better per image), Adam lr {s['gap_lr']}, "
             f"checked every {s.get('gap_check_every', 'n/a')} steps, stopped after "
             f"{s.get('gap_patience', 'n/a')} checks without improvement or {s['gap_steps']} steps"
             + (f", on the first {s['gap_images']} images (and the generalisation too)"
                if s.get("gap_images", s["num_images"]) < s["num_images"] else "")
             + f"; seed {s['seed']}"
             + (f"; scenes merged from {s['merge_scenes']} images, "
                f"{_fmt(s['objects_per_image'], '.2f')} objects per scene" if s["merge_scenes"] > 1 else "")
             + ". Nats per image, mean ± standard error over images."
             + (f" Lowered to fit the time limit of {s['time_limit']:.0f} s" if s.get("reduced_for_time") else "")
             + (f", which even the lowest settings exceed (about {s['planned_seconds']:.0f} s planned)."
                if s.get("reduced_for_time") and s["planned_seconds"] > s["time_limit"]
                else "." if s.get("reduced_for_time") else ""),
             "",
             "| run | guide | K | step | ELBO | IWAE | log p(x) | ELBO(q*) | approximation gap | amortization gap "
             "| k-hat (> 0.7) | q* steps (guide / prior) | KL | NLL | MSE | FG-ARI | ARI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        t = r["final_step"] - 1
        khat = (f"{_fmt(r.get('khat'), '.2f')} ({_fmt(r.get('khat_above_0.7'), '.0%')})"
                if "khat" in r else "n/a")
        lines.append(f"| {name} | {r['guide']} | {r['num_slots']} | {r['final_step']} | {_pm(r, 'elbo', '.1f', t)} | "
                     f"{_pm(r, 'iwae', '.1f', t)} | {_pm(r, 'log_px', '.1f')} | {_pm(r, 'optimized_elbo', '.1f')} | "
                     f"{_pm(r, 'approximation_gap', '.1f')} | {_pm(r, 'amortization_gap', '.1f', t)} | {khat} | "
                     f"{_fmt(r.get('gap_steps_from_guide'), '.0f')} / {_fmt(r.get('gap_steps_from_prior'), '.0f')} | "
                     f"{_fmt(r['kl'][t], '.1f')} | {_fmt(r['nll'][t], '.1f')} | {_fmt(r['mse'][t], '.5f')} | "
                     f"{_fmt(r['fg_ari'][t], '.3f')} | {_fmt(r['ari'][t], '.3f')} |")
    general = [(n, r["generalization"]) for n, r in result["runs"].items() if "generalization" in r]
    if general:
        lines += ["", "## Generalisation: more objects, other K (final step)", "",
                  "| run | scenes | objects | K | ELBO | IWAE | MSE | FG-ARI | ARI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, g in general:
            if "skipped" in g:
                lines.append(f"| {name} | skipped: {g['skipped']} | | | | | | | |")
                continue
            for key, row in g.items():
                if key.startswith("K="):
                    lines.append(f"| {name} | merged from {g['merge_scenes']} | "
                                 f"{_fmt(g['objects_per_image'], '.2f')} | "
                                 f"{key[2:]} | {_pm(row, 'elbo', '.1f')} | {_pm(row, 'iwae', '.1f')} | "
                                 f"{_pm(row, 'mse', '.5f')} | {_pm(row, 'fg_ari', '.3f')} | {_pm(row, 'ari', '.3f')} |")
    for name, r in result["runs"].items():
        lines += ["", f"## {name}: every step against its cost (trained at step {r['trained_step']})", "",
                  "| step | decoder passes | CPU s / image | ELBO | IWAE | amortization gap | KL | NLL | MSE "
                  "| FG-ARI | ARI |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in range(r["steps"]):
            mark = " (T)" if t + 1 == r["trained_step"] else ""
            cost = r.get("cpu_seconds", [float("nan")] * r["steps"])[t]
            lines.append(f"| {t + 1}{mark} | {t + 1} | {_fmt(cost, '.4f')} | {_pm(r, 'elbo', '.1f', t)} | "
                         f"{_pm(r, 'iwae', '.1f', t)} | {_pm(r, 'amortization_gap', '.1f', t)} | "
                         f"{_fmt(r['kl'][t], '.1f')} | {_fmt(r['nll'][t], '.1f')} | {_fmt(r['mse'][t], '.5f')} | "
                         f"{_fmt(r['fg_ari'][t], '.3f')} | {_fmt(r['ari'][t], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.png in directory `out`: all three whole or none
    (the JSON and the table are staged and put in place with the picture, `iodine_pyro.io`)."""
    from .figures import draw_comparison          # here, not at the top: comparing loads no matplotlib
    from .io import stage_text

    out = Path(out)
    paths = {"json": out / "compare.json", "table": out / "compare.md", "plot": out / "compare.png"}
    stage_text(paths["json"], json.dumps(result, indent=1) + "\n", companion=paths["plot"])
    stage_text(paths["table"], markdown_table(result), companion=paths["plot"])
    draw_comparison(result, paths["plot"])
    return paths
