"""Compare guides on the same images: ELBO, log p(x), amortization gap, FG-ARI, MSE, KL.

Definitions (all in nats per image, averaged over images; t indexes the guide's decoder
passes, t = 1..L, with L = 2T for an iterative guide by default and L = 1 for the
amortized guide):

* ELBO_t = E_{q_t}[log p(x | z)] - KL(q_t(z) || p(z)), with q_t = q(z | lambda_t) of the
  step's own refinement path, the expectation estimated with S samples of q_t and the KL
  in closed form (as training's `TraceMeanField_ELBO`). ``nll`` = -E_{q_t}[log p(x | z)].
* IWAE_t = log (1/S) sum_s p(x, z_s) / q_t(z_s), z_s ~ q_t: an importance-weighted
  estimate of log p(x) with proposal q_t. Its expectation is a lower bound on log p(x)
  that tightens with S, and it is never below the S-sample ELBO with Monte Carlo KL
  (Jensen); with the closed-form KL above, up to Monte Carlo noise. The weights come
  from Pyro traces: the proposal program is traced, the model replayed on its samples,
  and each site is scored by its own distribution, per image.
* Amortization gap (Cremer et al., 2018) = ELBO(q*) - ELBO_t, where q* is a per-image
  mean-field Gaussian over z [K, n_z] optimised directly on that image's ELBO with the
  decoder fixed: initialised at the guide's posterior at the trained step T (trained
  pass, for the ``deepmind`` preset T + 1), then ``gap_steps`` steps of Adam on Pyro's
  `TraceMeanField_ELBO` of the one-step model. ELBO(q*) uses the same S-sample estimator.
  The gap is reported for every step t; at t = T it is the guide's amortization gap.
  ``optimized_iwae`` is the IWAE with q* as proposal (usually the tighter log p(x) estimate).
* MSE, FG-ARI, ARI: of the reconstruction and masks decoded from the step's own sample
  z_t, exactly as ``evaluate`` reports them.

`merge_scenes` builds scenes with more objects than training (for the generalisation
experiment) from a stored dataset with a uniform background, such as Tetrominoes.
"""

from __future__ import annotations

import json
import logging
import math
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
from .config import check_memory
from .data import load_images
from .evaluate import METRICS as TABLE
from .evaluate import score_steps
from .figures import draw_comparison
from .models.generative import step_scale
from .posterior import check_slots, rng_devices
from .run import IMAGES, Run
from .system import Iodine

log = logging.getLogger(__name__)

__all__ = ["compare", "importance_terms", "optimize_posterior", "merge_scenes", "load_images_for",
           "write_report", "markdown_table"]

OWN = ("elbo", "iwae", "nll", "kl", "amortization_gap")       # this module's estimators
# ... and every per-image metric of the evaluation table that they do not define
METRICS = OWN + tuple(k for k in TABLE if k not in OWN and k != "pred_nll")
PIXEL_BUDGET = 2 ** 21        # decoded slot-pixels per decoder call when scoring samples


# -- the estimators ------------------------------------------------------------------------
def _proposal(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
    """A mean-field Gaussian over the one-step model's latent site ``t0/z``."""
    B = x.shape[0]
    with pyro.plate("images", B), step_scale(1.0, B):
        pyro.sample("t0/z", dist.Normal(loc, scale).to_event(2))      # [B, K, n_z]


def _site_log_prob(trace, name: str) -> torch.Tensor:
    """Unscaled log density of one site, per image: [B]."""
    site = trace.nodes[name]
    return site["fn"].log_prob(site["value"])


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
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(
            xs, None, num_slots=K)
        lp_z = _site_log_prob(model_tr, "t0/z")                         # [n*B]
        lp_x = _site_log_prob(model_tr, "t0/x")                         # [n*B]
        lq_z = _site_log_prob(guide_tr, "t0/z")                         # [n*B]
        log_w.append((lp_z + lp_x - lq_z).view(n, B))
        log_lik.append(lp_x.view(n, B))
    model.forget()
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

    model = poutine.block(system.model.model, hide_types=["param"])
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
        system.model.forget()
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
        raise ValueError(f"--merge-scenes must be at least 1, got {merge}")
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
                   iw_samples: int = 16, gap_steps: int = 200, gap_lr: float = 0.01,
                   background: int = 1, tick=None) -> dict[str, torch.Tensor]:
    """Per-image values of every metric at every step for one batch.

    The evaluation table's metrics (`iodine_pyro.evaluate.METRICS`) come from the engine
    (FG-ARI dropping `background` groups), the estimators from this module; the per-image
    posterior of the amortization gap starts from the trained step T (the last step when
    fewer are run). `tick(n)` reports n units of work done (one per step, one per Adam step).

    Returns:
        {metric: [L, B]} for `METRICS`, plus ``optimized_elbo``, ``optimized_iwae``,
        ``optimized_kl``, ``optimized_nll`` [B].
    """
    tick = tick or (lambda n=1: None)
    steps = system.infer(x, num_iters=num_iters, num_slots=num_slots)    # L x StepResult
    trained = min(len(system.weights()), len(steps)) - 1 if system.guide.refines else 0
    per: dict[str, list[torch.Tensor]] = {k: [] for k in OWN if k != "amortization_gap"}
    for s in steps:
        q = system.guide.posterior(s.lam)                                 # batch [B, K, n_z]
        for k, v in _elbo_iwae(system, x, q, iw_samples).items():
            per[k].append(v.double())
        tick(1)
    nan = torch.full((len(steps), x.shape[0]), float("nan"), dtype=torch.float64)
    table = score_steps(system, x, steps, masks, background, [k for k in METRICS if k in TABLE and k not in OWN])
    q_star = optimize_posterior(system, x, system.guide.posterior(steps[trained].lam),
                                steps=gap_steps, lr=gap_lr, tick=lambda: tick(1))
    opt = {f"optimized_{k}": v.double() for k, v in _elbo_iwae(system, x, q_star, iw_samples).items()}
    per["amortization_gap"] = [opt["optimized_elbo"] - e for e in per["elbo"]]
    out = {k: torch.stack(v).cpu() for k, v in per.items()}              # [L, B]
    out.update({k: table.get(k, nan) for k in METRICS if k not in OWN})  # [L, B]; NaN without masks
    out.update({k: v.cpu() for k, v in opt.items()})                     # [B]
    return out


def _run_name(run: Run, taken: set[str]) -> str:
    base = run.name
    name, i = base or "run", 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def compare(runs: Sequence[Run | str | Path], *, num_images: int = 64, num_iters: int | None = None,
            num_slots: int | None = None, iw_samples: int = 16, gap_steps: int = 200,
            gap_lr: float = 0.01, seed: int = 0,
            data: str | Path | Mapping[str, torch.Tensor] | None = None, batch_size: int = 16,
            merge: int = 1, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Evaluate the guides of several runs on the same images (see the module docstring).

    Args:
        runs: `Run`s, or what `Run.open` takes (run directories, checkpoint files,
            ``pretrained:NAME``); their image shapes must agree.
        num_images: images (scenes, after merging) to evaluate.
        num_iters: refinement steps of guides that refine (default: each run's trained T;
            more looks beyond it, fewer stops early); a one-shot guide always takes one.
        num_slots: K at test time (guides that can change K; others refuse another K).
        iw_samples: S, the samples of every ELBO / IWAE estimate.
        gap_steps, gap_lr: Adam steps and learning rate of the per-image posterior.
        seed: seeds the refinement and every estimate (the same for every run).
        data: stored dataset, in-memory dict (``image``, ``mask``) or None (first run's).
        batch_size: images per batch.
        merge: source images merged into each scene (`merge_scenes`); 1 leaves them alone.
        progress: a progress bar over all runs with an estimate of the time left.
    Returns:
        ``{"settings": {...}, "runs": {name: {...}}}``: per run the lists over steps 1..L of
        every metric in `METRICS`, ``trained_step`` (1-based position of the trained T in
        those lists, which may lie beyond L), ``final_step`` (the trained step, or L when
        fewer steps were run), ``optimized_elbo`` / ``optimized_iwae`` / ``optimized_kl`` /
        ``optimized_nll`` and ``final`` (every metric at the final step).
    """
    if not runs:
        raise ValueError("give at least one run directory")
    for name, value in [("--num-images", num_images), ("--iw-samples", iw_samples),
                        ("--batch-size", batch_size), ("--merge-scenes", merge)]:
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if gap_steps < 0 or not gap_lr > 0:
        raise ValueError(f"--gap-steps must be >= 0 and --gap-lr > 0, got {gap_steps} and {gap_lr}")
    for name, value in [("--num-iters", num_iters), ("--num-slots", num_slots)]:
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
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
    settings = {"num_images": N, "data": where, "merge_scenes": merge, "objects_per_image": objects,
                "background_groups": background, "num_iters": num_iters, "num_slots": num_slots,
                "iw_samples": iw_samples, "gap_steps": gap_steps, "gap_lr": gap_lr, "seed": seed,
                "batch_size": batch_size}
    plans = []
    for run in opened:
        refines = run.system.guide.refines
        iters = (num_iters or run.cfg.guide.num_iters) if refines else None
        L = len(run.system.weights(iters)) if refines else 1
        plans.append((run, iters, L))
    work = sum(math.ceil(N / batch_size) * (L + gap_steps) for _, _, L in plans)   # steps + Adam steps
    bar = tqdm(total=work, disable=not progress, desc="compare", unit="step", dynamic_ncols=True)
    results: dict[str, Any] = {}
    for run, iters, L in plans:
        name = _run_name(run, set(results))
        system, cfg = run.system, run.cfg
        try:
            system.check_batch(x_all[:1])
        except ValueError as e:
            raise ValueError(f"{run.ref}: {e}") from None
        trained = len(system.weights()) if system.guide.refines else 1
        bar.set_postfix_str(name)
        log.info("comparing %s (%s guide) on %d images", name, cfg.guide.kind, N)
        parts: list[dict[str, torch.Tensor]] = []
        with pyro.get_param_store().scope(), torch.random.fork_rng(devices=rng_devices(x_all)):
            torch.manual_seed(seed)
            for start in range(0, N, batch_size):
                stop = min(start + batch_size, N)
                parts.append(evaluate_guide(system, x_all[start:stop],
                                            m_all[start:stop] if m_all is not None else None,
                                            num_iters=iters, num_slots=num_slots, iw_samples=iw_samples,
                                            gap_steps=gap_steps, gap_lr=gap_lr, background=background,
                                            tick=bar.update))
        joined = {k: torch.cat([p[k] for p in parts], -1) for k in parts[0]}   # [L, N] or [N]
        result: dict[str, Any] = {k: [metrics.summarize(row) for row in joined[k]] for k in METRICS}
        result.update({k: metrics.summarize(joined[k]) for k in joined if k.startswith("optimized_")})
        final = min(trained, L)
        result["final"] = {k: result[k][final - 1] for k in METRICS}
        result.update(run_dir=run.ref, guide=cfg.guide.kind, dataset=cfg.dataset, preset=cfg.preset,
                      checkpoint_step=run.step, trained_num_iters=cfg.guide.num_iters if system.guide.refines else 0,
                      trained_num_slots=cfg.model.num_slots, num_slots=num_slots or cfg.model.num_slots,
                      steps=L, trained_step=trained, final_step=final)
        results[name] = result
    bar.close()
    return {"settings": settings, "runs": results}


# -- the report -----------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """A summary table at each run's trained step, then per-step tables of iterative guides."""
    s = result["settings"]
    lines = [f"# Guide comparison on {s['num_images']} images of {s['data']}", "",
             f"S = {s['iw_samples']} samples per estimate; amortization gap against a per-image "
             f"posterior optimised for {s['gap_steps']} Adam steps (lr {s['gap_lr']}); seed {s['seed']}"
             + (f"; scenes merged from {s['merge_scenes']} images, "
                f"{_fmt(s['objects_per_image'], '.2f')} objects per scene" if s["merge_scenes"] > 1 else "")
             + ". Nats per image.", "",
             "| run | guide | K | step | ELBO | IWAE | optimized ELBO | gap | KL | NLL | MSE | FG-ARI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        f = r["final"]
        lines.append(f"| {name} | {r['guide']} | {r['num_slots']} | {r['final_step']} | {_fmt(f['elbo'], '.1f')} | "
                     f"{_fmt(f['iwae'], '.1f')} | {_fmt(r['optimized_elbo'], '.1f')} | "
                     f"{_fmt(f['amortization_gap'], '.1f')} | {_fmt(f['kl'], '.1f')} | {_fmt(f['nll'], '.1f')} | "
                     f"{_fmt(f['mse'], '.5f')} | {_fmt(f['fg_ari'], '.3f')} |")
    for name, r in result["runs"].items():
        if r["steps"] < 2:
            continue
        lines += ["", f"## {name}: every refinement step (trained T at step {r['trained_step']})", "",
                  "| step | ELBO | IWAE | gap | KL | NLL | MSE | FG-ARI | ARI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in range(r["steps"]):
            mark = " (T)" if t + 1 == r["trained_step"] else ""
            lines.append(f"| {t + 1}{mark} | {_fmt(r['elbo'][t], '.1f')} | {_fmt(r['iwae'][t], '.1f')} | "
                         f"{_fmt(r['amortization_gap'][t], '.1f')} | {_fmt(r['kl'][t], '.1f')} | "
                         f"{_fmt(r['nll'][t], '.1f')} | {_fmt(r['mse'][t], '.5f')} | "
                         f"{_fmt(r['fg_ari'][t], '.3f')} | {_fmt(r['ari'][t], '.3f')} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.png in directory `out`: all three whole or none
    (the JSON and the table are staged and put in place with the picture, `iodine_pyro.io`)."""
    from .io import stage_text

    out = Path(out)
    paths = {"json": out / "compare.json", "table": out / "compare.md", "plot": out / "compare.png"}
    stage_text(paths["json"], json.dumps(result, indent=1) + "\n", companion=paths["plot"])
    stage_text(paths["table"], markdown_table(result), companion=paths["plot"])
    draw_comparison(result, paths["plot"])
    return paths
