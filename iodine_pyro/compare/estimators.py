"""The comparison's estimators: ELBO, IWAE, importance-sampled log p(x) with PSIS k-hat,
and q*, a per-image diagonal Gaussian fitted with the decoder fixed.

Each is a function of a log-joint and a proposal, so the same code estimates IODINE's
model (`model_log_joint`, `importance_terms`) and the linear-Gaussian model of the tests,
whose log p(x) and posterior are exact (tests/analysis/test_protocol.py).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import Normal, kl_divergence

from ..models.generative import site_plates, step_scale
from ..system import Iodine

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
