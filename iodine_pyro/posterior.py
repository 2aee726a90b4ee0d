"""Posterior samples of a trained run with Pyro's `Predictive`, stored as an ArviZ-readable tree.

What is sampled
---------------
The draws are of the guide's q, IODINE's amortised approximation, not of the model's exact
posterior p(z | x). IODINE's approximate posterior over the K slot latents of an image x is the last refinement step's
q(z | lambda_T), and lambda_T is itself random: the refinement starts from samples of the
initial posterior and every step decodes a fresh sample. A posterior sample is therefore

    lambda_1 -> z_1 -> ... -> lambda_T      one full run of the guide (site f"t{t}/z" per step)
    z ~ q(z | lambda_T)                     the final site f"t{T-1}/z"  [B, K, n_z]

and `Predictive(guide, num_samples=S)` draws S of them, each from its own refinement path.
Samples of one image can therefore land in different modes (different decompositions of
the same scene): the paper's multi-stability experiment, `plot_multistability`.

Every draw is scored in float64 from the decoding the guide's final step made of it (the
guide decodes z to score its last step; decoding it again would double the decoder's work
for the same numbers):

    log p(x | z)            model.likelihood(decoded).log_prob(x), the final step's likelihood
    log p(x, z)             log p(x | z) + log N(z; 0, prior_var I), summed over slots and latents
    log w = log p(x, z) - log q(z | lambda_T)

where q(z | lambda_T) is the Normal(loc, scale) that drew this z: the final step's q, not the
(intractable) marginal of z over the refinement path. That decoding also gives the masks and
the reconstruction, deterministic functions of z; they are stored only with
``predictive=True``, as they cost nothing to compute but (K + C) x H x W floats per draw
and image to keep. With ``predictive=True`` the model is also replayed on the samples with
``x=None`` (`Predictive(model, posterior_samples=...)`, which is what
``Predictive(model, guide=guide)`` does internally) and the replicated images come from
its final site:

    x_rep ~ p(x | z_T)                      site f"t{T-1}/x"  [B, C, H, W]

The file
--------
`sample_posterior` returns an `xarray.DataTree`; `write_samples` stores it as netCDF-4 with
one group per ArviZ group, in ArviZ's InferenceData schema: ``arviz.from_netcdf(path)``
reads it and ``az.summary``, ``az.plot_posterior``, ``az.plot_trace``, ``az.plot_ppc``,
``az.loo`` and ``az.waic`` work on it as they are (``xarray.open_datatree`` reads it too).

==============================  ============================================  ===================================
group / variable                dims                                          meaning
==============================  ============================================  ===================================
posterior/z                     (chain, draw, image, slot, latent)            z ~ q(z | lambda_T)
posterior/masks                 (chain, draw, image, slot, height, width)     mixing weights pi(z) [predictive]
posterior/reconstruction        (chain, draw, image, channel, height, width)  sum_k pi_k mu_k(z) [predictive]
posterior_predictive/x          (chain, draw, image, channel, height, width)  x_rep ~ p(x | z) [predictive]
log_likelihood/x                (chain, draw, image)                          log p(x | z)
sample_stats/log_joint          (chain, draw, image)                          log p(x, z)
sample_stats/log_weight         (chain, draw, image)                          log p(x, z) - log q(z | lambda_T)
sample_stats/loc, scale         (chain, draw, image, slot, latent)            that draw's lambda_T
observed_data/x                 (image, channel, height, width)               the images, [0, 1]
constant_data/true_masks        (image, group, height, width)                 ground truth, when known
==============================  ============================================  ===================================

There is one chain (every draw is an independent run of the refinement, not a Markov
chain); ``draw`` counts the samples. Every dimension has coordinate values; ``image``
holds dataset indices; images are channel-first, as the model sees them. The variables
marked [predictive] are present only with ``predictive=True``. The log densities are
float64, the rest float32. Every group and the root carry the provenance attributes
(checkpoint, step, dataset, preset, guide, num_iters, num_slots, data, seed, created_by).

Each image has latents of its own, so ``az.loo`` here measures how well q's draws
importance-sample each image's own posterior, not prediction of held-out images; the Pareto
k-hat of ``log_weight`` (``az.psislw``) tells how far q is from the posterior.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import xarray as xr
from pyro.infer import Predictive
from tqdm.auto import tqdm

from .checkpoint import seeded
from .memory import check_memory, memory_available
from .models import Decoded
from .system import Iodine

log = logging.getLogger(__name__)

TRACE_BUDGET = 2 ** 26       # decoded floats held by the model traces of one `Predictive` call
SAMPLE_CHUNK = 10            # samples drawn per `Predictive` call (the unit of progress)
LOG_DENSITIES = ("log_likelihood", "log_joint", "log_weight")   # [S, B] per draw, kept in float64

__all__ = ["draw_samples", "sample_posterior", "write_samples",
           "plot_multistability", "version"]


def version() -> str:
    """"iodine-pyro <version>" of the installed package."""
    try:
        return f"iodine-pyro {pkg_version('iodine-pyro')}"
    except PackageNotFoundError:
        return "iodine-pyro"


def check_slots(system: Iodine, num_slots: int | None) -> None:
    """The amortized encoder emits exactly the trained K posteriors: refuse another K."""
    K = system.cfg.model.num_slots
    if not system.guide.can_change_slots and num_slots not in (None, K):
        raise ValueError(f"the {system.guide.kind} guide outputs its trained K={K} slots; "
                         f"`num_slots` {num_slots} needs a guide that can change K (the iterative guide)")


class _Programs:
    """The guide and the model as Pyro programs of (x, weights, num_slots), for `Predictive`.

    The guide program runs the system's guide on x and records, with `pyro.deterministic`,
    the final posterior's parameters, the log-likelihood of x under the final step's own
    decoding of its sample (float64) and the decoded quantities named in `keep` (masks,
    reconstruction, means); the model program is the system's model with ``x=None``, so
    that its observation sites are sampled.
    """

    # deterministic site: (value of the final step's decoding, event dims)
    DECODED = {"masks": 3, "reconstruction": 3, "means": 4}

    def __init__(self, system: Iodine, keep: tuple[str, ...] = ()):
        self.system, self.keep = system, keep

    def guide(self, x, weights, num_slots=None):
        steps = self.system.guide(x, weights, num_slots=num_slots)
        q = self.system.guide.posterior(steps[-1].lam)                    # batch [B, K, n_z]
        pyro.deterministic("loc", q.loc.detach(), event_dim=2)            # [B, K, n_z]
        pyro.deterministic("scale", q.scale.detach(), event_dim=2)        # [B, K, n_z]
        d = steps[-1].decoded                                             # the decoding of the sampled z
        pixels = self.system.model.likelihood(Decoded(d.means.double(), d.mask_logits.double()))
        pyro.deterministic("log_likelihood", pixels.log_prob(x.double()))  # [B]
        if self.keep:
            masks = d.masks
            decoded = {"masks": masks, "reconstruction": d.reconstruction(masks), "means": d.means}
            for k in self.keep:
                pyro.deterministic(k, decoded[k].detach(), event_dim=self.DECODED[k])

    def model(self, x, weights, num_slots=None):
        self.system.model(None, weights, batch_size=x.shape[0], num_slots=num_slots)


def _log_densities(system: Iodine, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                   log_lik: torch.Tensor) -> dict[str, torch.Tensor]:
    """log p(x | z), log p(x, z) and log w of draws z [S, B, K, n_z] of q = Normal(loc, scale),
    given their log-likelihoods [S, B]; float64, [S, B] each."""
    z64 = z.double()
    log_prior = system.model.prior(z.shape[1], z.shape[2], like=z64).log_prob(z64).sum((-2, -1))
    log_joint = log_lik.double() + log_prior
    log_q = torch.distributions.Normal(loc.double(), scale.double()).log_prob(z64).sum((-2, -1))
    return {"log_likelihood": log_lik.double(), "log_joint": log_joint, "log_weight": log_joint - log_q}


@torch.no_grad()
def draw_samples(system: Iodine, x: torch.Tensor, num_samples: int, *, num_iters: int | None = None,
                 num_slots: int | None = None, predictive: bool = False,
                 keep_means: bool = False) -> dict[str, torch.Tensor]:
    """S posterior samples of one batch with Pyro's `Predictive` (uses the global RNG), scored.

    Args:
        x: [B, C, H, W] images in [0, 1].
        num_samples: S, each from its own run of the guide's refinement.
        num_iters: refinement iterations (default: the trained T; may exceed it).
        num_slots: K at test time (iterative guide only).
        predictive: also return each draw's masks and reconstruction, and replay the model
            with x=None on each sample for replicated images.
        keep_means: with `predictive`, also return the slots' means.
    Returns:
        ``z``, ``loc``, ``scale`` [S, B, K, n_z]; ``log_likelihood`` (log p(x | z) under the
        final step's likelihood), ``log_joint`` (log p(x, z)) and ``log_weight``
        (log p(x, z) - log Normal(z; loc, scale)), [S, B] in float64; with `predictive` also
        ``x`` [S, B, C, H, W] (x_rep ~ p(x | z)), ``masks`` [S, B, K, H, W],
        ``reconstruction`` [S, B, C, H, W] (and ``means`` [S, B, K, C, H, W]); all detached,
        on x's device.
    """
    if num_samples < 1:
        raise ValueError(f"the number of samples must be at least 1, got {num_samples}")
    check_slots(system, num_slots)
    system.check_batch(x)
    weights = system.weights(num_iters)
    last = f"t{len(weights) - 1}"
    keep = (("masks", "reconstruction") + (("means",) if keep_means else ())) if predictive else ()
    programs = _Programs(system, keep)
    z_sites = [f"t{t}/z" for t in range(len(weights))]
    with pyro.get_param_store().scope():                  # leave the caller's param store alone
        post = Predictive(programs.guide, num_samples=num_samples,
                          return_sites=(z_sites if predictive else [f"{last}/z"])
                          + ["loc", "scale", "log_likelihood", *keep])(x, weights, num_slots)
        # Predictive pads sites to its plate nesting ([S, 1, B, ...]): read each as [S, B, ...]
        event = {"z": 2, "loc": 2, "scale": 2, "log_likelihood": 0, **programs.DECODED}
        lead = (num_samples, x.shape[0])
        out = {k: v.reshape(lead + v.shape[v.dim() - event[k]:])
               for k, v in [("z", post[f"{last}/z"])] + [(k, post[k]) for k in ("loc", "scale", *keep)]}
        out.update(_log_densities(system, out["z"], out["loc"], out["scale"],
                                  post["log_likelihood"].reshape(lead)))
        if predictive:
            # Predictive keeps every sample's trace, whose pixel distributions hold the
            # decoded slots of all T steps: replay the samples a chunk at a time
            (B, K), (C, H, W) = out["z"].shape[1:3], x.shape[1:]
            chunk = max(1, TRACE_BUDGET // (len(weights) * B * K * (C + 1) * H * W))
            parts = [Predictive(programs.model, posterior_samples={s: post[s][s0:s0 + chunk] for s in z_sites},
                                return_sites=[f"{last}/x"])(x, weights, num_slots)[f"{last}/x"]
                     for s0 in range(0, num_samples, chunk)]
            out["x"] = torch.cat([p.reshape(p.shape[0], B, C, H, W) for p in parts])   # [S, B, C, H, W]
    return {k: v.detach() for k, v in out.items()}


def _attr_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str, np.integer, np.floating)):
        return v
    return str(v)


def sample_posterior(system: Iodine, x: torch.Tensor, num_samples: int, *,
                     num_iters: int | None = None, num_slots: int | None = None,
                     predictive: bool = False, seed: int = 0,
                     true_masks: torch.Tensor | None = None,
                     image_index: Sequence[int] | None = None, batch_size: int | None = None,
                     attrs: dict[str, Any] | None = None, progress: bool = False) -> xr.DataTree:
    """S posterior samples of every slot latent of every image, scored, as an ArviZ
    InferenceData-schema DataTree.

    The draws are of the guide's q, the final refinement step's q(z | lambda_T), not of the
    exact posterior; each sample re-runs the guide from scratch (see the module docstring).
    Every draw's log-likelihood, log joint and log importance weight are always stored; the
    masks and reconstruction (deterministic functions of z) and the replicated images only
    with `predictive`, as they take (2C + K) x H x W floats per draw and image. Sampling is
    seeded with `seed` inside a forked RNG (the caller's RNG state is left as it was): the
    same seed, images and `batch_size` give the same samples.

    Args:
        system: a trained `Iodine` (e.g. from `evaluate.load_run`).
        x: [N, C, H, W] images in [0, 1].
        num_samples: S >= 1.
        num_iters: refinement iterations (default: the trained T; may exceed it).
        num_slots: K at test time (default: the trained K; iterative guide only).
        predictive: also store each draw's masks and reconstruction and sample replicated
            images x_rep ~ p(x | z) (the posterior predictive).
        seed: seed of the samples.
        true_masks: [N, G, H, W] ground-truth masks, stored under constant_data.
        image_index: the images' dataset indices (default 0..N-1), the ``image`` coordinate.
        batch_size: images per guide run (default: all N at once).
        attrs: provenance attributes to add (checkpoint, data, ...).
        progress: a progress bar with an estimate of the time left.
    Returns:
        a DataTree with groups ``posterior``, ``log_likelihood``, ``sample_stats``,
        ``observed_data``, ``constant_data`` (with `true_masks`) and, with `predictive`,
        ``posterior_predictive``.
    """
    N = x.shape[0]
    image_index = _check_request(system, x, num_samples, num_iters=num_iters, num_slots=num_slots,
                                 predictive=predictive, true_masks=true_masks, image_index=image_index,
                                 batch_size=batch_size)
    arrays = _draw_all(system, x, num_samples, batch_size=batch_size or N, seed=seed, num_iters=num_iters,
                       num_slots=num_slots, predictive=predictive, progress=progress)
    info = _provenance(system, num_samples, K=arrays["z"].shape[2], num_iters=num_iters, seed=seed,
                       predictive=predictive, attrs=attrs)
    return _inference_tree(arrays, x, info, image_index=image_index, true_masks=true_masks, predictive=predictive,
                           site=f"t{len(system.weights(num_iters)) - 1}")


def _check_request(system: Iodine, x: torch.Tensor, num_samples: int, *, num_iters: int | None,
                   num_slots: int | None, predictive: bool, true_masks: torch.Tensor | None,
                   image_index: Sequence[int] | None, batch_size: int | None) -> np.ndarray:
    """`sample_posterior`'s request checked before any work (K, memory for the networks and
    for the draws kept, shapes); returns the images' dataset indices."""
    N = x.shape[0]
    if N < 1:
        raise ValueError("no images to sample")
    if num_samples < 1:
        raise ValueError(f"the number of samples must be at least 1, got {num_samples}")
    check_slots(system, num_slots)                        # before any work (and any progress bar)
    check_memory(system.cfg, x.device, batch=batch_size or N, num_slots=num_slots, num_iters=num_iters,
                 training=False, what="sample")
    K, (C, H, W) = num_slots or system.cfg.model.num_slots, x.shape[1:]
    per_draw = 3 * K * system.cfg.model.latent_dim + 6 + ((2 * C + K) * H * W if predictive else 0)   # floats
    need, have = 4 * num_samples * N * per_draw, memory_available(x.device if x.is_cuda else "cpu")
    if have is not None and need > have:
        raise ValueError(f"{num_samples} samples of {N} images would hold {need / 2**30:,.1f} GiB "
                         f"(this machine has {have / 2**30:,.1f} GiB): ask for fewer `num_samples` or `num_images`")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    image_index = np.arange(N) if image_index is None else np.asarray(image_index, dtype=np.int64)
    if image_index.shape != (N,):
        raise ValueError(f"image_index has {image_index.size} entries for {N} images")
    if true_masks is not None and (true_masks.dim() != 4 or true_masks.shape[0] != N
                                   or true_masks.shape[2:] != x.shape[2:]):
        raise ValueError(f"true_masks of shape {tuple(true_masks.shape)} do not fit images {tuple(x.shape)}")
    return image_index


def _draw_all(system: Iodine, x: torch.Tensor, num_samples: int, *, batch_size: int, seed: int,
              num_iters: int | None, num_slots: int | None, predictive: bool,
              progress: bool) -> dict[str, np.ndarray]:
    """Every image's draws (`draw_samples`, `SAMPLE_CHUNK` at a time for the progress bar),
    seeded in a forked RNG: {name: [S, N, ...]}, log densities in float64."""
    N = x.shape[0]
    log.info("drawing %d posterior samples for %d images, %d at a time", num_samples, N, batch_size)
    chunks: list[dict[str, torch.Tensor]] = []
    bar = tqdm(total=N * num_samples, disable=not progress, desc="sample", unit="sample", dynamic_ncols=True)
    with seeded(seed, x):
        for start in range(0, N, batch_size):
            xb, parts = x[start:start + batch_size], []
            for s0 in range(0, num_samples, SAMPLE_CHUNK):     # a few samples at a time: progress
                n = min(SAMPLE_CHUNK, num_samples - s0)
                drawn = draw_samples(system, xb, n, num_iters=num_iters, num_slots=num_slots,
                                     predictive=predictive)
                parts.append({k: v.cpu() for k, v in drawn.items()})
                bar.update(n * xb.shape[0])
            chunks.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})   # samples on axis 0
    bar.close()
    arrays = {k: torch.cat([c[k] for c in chunks], 1) for k in chunks[0]}              # image axis 1
    return {k: (v.double() if k in LOG_DENSITIES else v.float()).numpy() for k, v in arrays.items()}


def _provenance(system: Iodine, num_samples: int, *, K: int, num_iters: int | None, seed: int,
                predictive: bool, attrs: dict[str, Any] | None) -> dict[str, Any]:
    """The file's attributes: what made it, from which model and guide, with which settings."""
    cfg = system.cfg
    weights = system.weights(num_iters)
    info = {
        "created_by": version(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inference_library": "pyro", "inference_library_version": pyro.__version__,
        "dataset": cfg.dataset, "preset": cfg.preset, "guide": cfg.guide.kind,
        "trained_num_iters": cfg.guide.num_iters, "trained_num_slots": cfg.model.num_slots,
        "num_iters": (num_iters or cfg.guide.num_iters) if system.guide.refines else 0,
        "num_slots": K, "num_samples": num_samples, "seed": seed, "predictive": predictive,
        "precision": system.precision,
        "site": f"t{len(weights) - 1}/z",
        "posterior": system.guide.description,
        "config": json.dumps(cfg.to_dict()),
    }
    info.update(attrs or {})
    return {k: _attr_value(v) for k, v in info.items() if v is not None}


def _inference_tree(arrays: dict[str, np.ndarray], x: torch.Tensor, info: dict[str, Any], *,
                    image_index: np.ndarray, true_masks: torch.Tensor | None, predictive: bool,
                    site: str) -> xr.DataTree:
    """The draws as ArviZ's InferenceData groups (one chain; see the module docstring)."""
    S, K = arrays["z"].shape[0], arrays["z"].shape[2]             # z: [S, N, K, n_z]
    C, H, W = x.shape[1:]
    arrays = {k: v[None] for k, v in arrays.items()}                   # one chain: [1, S, ...]
    coords = {"chain": np.arange(1), "draw": np.arange(S), "image": image_index, "slot": np.arange(K),
              "latent": np.arange(arrays["z"].shape[-1]), "channel": np.arange(C), "height": np.arange(H),
              "width": np.arange(W)}
    if true_masks is not None:
        coords["group"] = np.arange(true_masks.shape[1])

    def dataset(variables: dict[str, tuple[tuple[str, ...], np.ndarray, str]]) -> xr.Dataset:
        """A group: its variables (dims, values, description), the coordinates of their dims."""
        dims = {d for v in variables.values() for d in v[0]}
        ds = xr.Dataset({k: (v[0], v[1]) for k, v in variables.items()},
                        coords={d: c for d, c in coords.items() if d in dims}, attrs=info)
        for k, v in variables.items():
            ds[k].attrs["description"] = v[2]
        return ds

    zdims = ("chain", "draw", "image", "slot", "latent")
    draw_image = ("chain", "draw", "image")
    images = ("chain", "draw", "image", "channel", "height", "width")
    posterior = {"z": (zdims, arrays["z"], "z ~ q(z | lambda_T), one refinement path per sample")}
    if predictive:
        posterior.update(
            masks=(("chain", "draw", "image", "slot", "height", "width"), arrays["masks"],
                   "mixing weights pi(z): softmax over slots of the decoded mask logits"),
            reconstruction=(images, arrays["reconstruction"], "sum_k masks_k * means_k(z)"))
    groups = {"/": xr.Dataset(attrs=info), "posterior": dataset(posterior)}
    if predictive:
        groups["posterior_predictive"] = dataset(
            {"x": (images, arrays["x"], f"x_rep ~ p(x | z), site {site}/x of the model")})
    groups["log_likelihood"] = dataset(
        {"x": (draw_image, arrays["log_likelihood"],
               "log p(x | z) of each observed image under the final step's likelihood")})
    groups["sample_stats"] = dataset({
        "log_joint": (draw_image, arrays["log_joint"], "log p(x, z) = log p(x | z) + log p(z)"),
        "log_weight": (draw_image, arrays["log_weight"],
                       "log p(x, z) - log q(z | lambda_T), q the final step's Normal(loc, scale) of this "
                       "draw, not the intractable marginal of z over the refinement path"),
        "loc": (zdims, arrays["loc"], "mean of that sample's final posterior q(z | lambda_T)"),
        "scale": (zdims, arrays["scale"], "standard deviation of that sample's final posterior")})
    groups["observed_data"] = dataset(
        {"x": (("image", "channel", "height", "width"), x.detach().cpu().float().numpy(),
               "observed images in [0, 1], channel-first")})
    if true_masks is not None:
        groups["constant_data"] = dataset(
            {"true_masks": (("image", "group", "height", "width"), true_masks.detach().cpu().float().numpy(),
                            "ground-truth masks; group 0 is the background")})
    return xr.DataTree.from_dict(groups)


def write_samples(tree: xr.DataTree, path: str | Path) -> Path:
    """Write `tree` as netCDF-4 (h5netcdf engine, zlib-compressed) to `path`, whole or not
    at all: the file is made in memory, then written to a temporary file that is renamed
    over `path` (`iodine_pyro.io`). HDF5 never writes to the disk itself (it can crash on a
    full one); a full disk or a read-only folder gives one line naming `path`, and leaves
    nothing behind."""
    import io

    from .io import check_target, write_bytes

    path = check_target(path)
    encoding = {node.path: {name: {"zlib": True, "complevel": 4} for name in node.data_vars}
                for node in tree.subtree if node.data_vars}
    buffer = io.BytesIO()
    tree.to_netcdf(buffer, engine="h5netcdf", encoding=encoding)
    write_bytes(path, buffer.getbuffer())
    return path


def plot_multistability(system: Iodine, x: torch.Tensor, path: str | Path, num_samples: int = 6, *,
                        num_iters: int | None = None, num_slots: int | None = None, seed: int = 0,
                        title: str | None = None) -> Path:
    """Several decompositions of one image, one per posterior sample (the paper's
    multi-stability figure): each row is an independent run of the refinement from its own
    initial samples, showing the image, the reconstruction, the segmentation and each slot.

    Args:
        x: [1, C, H, W] or [C, H, W], one image in [0, 1].
    """
    from .figures import draw_decomposition      # here, not at the top: sampling loads no matplotlib

    if x.dim() == 3:
        x = x.unsqueeze(0)                                                # [1, C, H, W]
    if x.shape[0] != 1:
        raise ValueError(f"multi-stability takes one image, got {x.shape[0]}")
    with seeded(seed, x):
        s = draw_samples(system, x, num_samples, num_iters=num_iters, num_slots=num_slots,
                         predictive=True, keep_means=True)
    S = num_samples
    arrays = {"image": x.expand(S, *x.shape[1:]).float().cpu().numpy(),            # [S, C, H, W]
              "recon": s["reconstruction"][:, 0, None].float().cpu().numpy(),      # [S, 1, C, H, W]
              "masks": s["masks"][:, 0, None].float().cpu().numpy(),               # [S, 1, K, H, W]
              "means": s["means"][:, 0, None].float().cpu().numpy(),               # [S, 1, K, C, H, W]
              "step": np.array([len(system.weights(num_iters))]), "image_index": np.zeros(S, int)}
    path = Path(path)
    draw_decomposition(arrays, path, title or "posterior samples", row_labels=[f"sample {i}" for i in range(S)])
    return path
