"""IODINE's generative model as a Pyro program.

Generative story, for each image b (plate ``images``):

    z_bk ~ N(0, prior_var I)                  k = 1..K      (site ``z``: plates images x slots)
    (m_bk, mu_bk) = decoder(z_bk)             all B*K slots in one decoder call
    pi_b = softmax_k(m_b)                     per pixel
    x_bhw ~ sum_k pi_bkhw prod_c p(x_bhwc | mu_bkhwc)   (site ``x``, `PixelMixture`)

Plates and shapes, Pyro's nested-plate convention (`site_plates`): ``images`` at dim -2,
``slots`` at dim -1. A latent site ``t{t}/z`` has batch shape [B, K] and event [n_z]; an
image site ``t{t}/x`` sits in the images plate only, so its batch shape is [B, 1] (its
value [B, 1, C, H, W]) and event [C, H, W]. Enclosing sample or particle plates
(``Predictive(..., parallel=True)``, vectorised particles) add dimensions on the left.

Training scores T copies of this one-step model, one per refinement step t, under
``scope(prefix=f"t{t}")`` and a scale w_t / B: with the guide scaling its step-t site
the same way, Pyro's stock ``Trace_ELBO`` / ``TraceMeanField_ELBO`` give exactly
sum_t w_t L_t, with L_t the per-image mean negative ELBO of step t.

Sequences (appendix A.1) use the same one-step model with one frame per step: given
frames x [B, F, C, H, W], step t scores frame t (site ``t{t}/x``) and, as next-step
prediction, frame t+1 under the same decoding (site ``t{t}/x_next``, for t < F-1):

    z_bt ~ N(0, prior_var I);  x_bt ~ p(x | z_bt);  x_b,t+1 ~ p(x | z_bt)

The guide decodes each of its samples to build its refinement inputs; it hands the
decoder output to the model with `remember`, and `decode` returns it for that very
sample tensor, so a training step runs the decoder once per z, not twice, in the forward
pass. The decoding is kept on the sample itself (the model's one memo): it lives as long
as that tensor and is used once, so there is nothing to clear. (With ``guide.recompute`` the backward pass runs it once more per z, deliberately:
see `iodine_pyro.guides.recompute`.)
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from typing import TYPE_CHECKING, NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.contrib.autoname import scope

from .decoders import DeconvDecoder, SpatialBroadcastDecoder
from .likelihood import PixelMixture, mixture_terms, reconstruction

if TYPE_CHECKING:
    from ..config import ModelConfig


class Decoded(NamedTuple):
    means: torch.Tensor        # [B, K, C, H, W]
    mask_logits: torch.Tensor  # [B, K, H, W]

    @property
    def masks(self) -> torch.Tensor:
        """pi = softmax over slots of the mask logits: [B, K, H, W]."""
        return self.mask_logits.softmax(-3)

    def reconstruction(self, masks: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k pi_k mu_k: [B, C, H, W] (`masks` when the caller has them already)."""
        return reconstruction(self.means, self.masks if masks is None else masks)


def loss_weights(kind: str, num_iters: int) -> list[float]:
    """Weights w_t of the per-step losses; one weight per decoder pass.

    ``paper``: sum_{t=1..T} (t/T) L_t (T decoder passes, T-1 refinements used).
    ``deepmind``: t = 0..T with weights linspace(0, 1, T+1) (T+1 passes, T refinements;
    the initial posterior's term has weight 0).
    """
    T = num_iters
    if kind == "paper":
        return [t / T for t in range(1, T + 1)]
    return [t / T for t in range(0, T + 1)]


def frame_weights(kind: str, num_frames: int) -> list[float]:
    """Weights of a sequence of `num_frames` frames: one decoder pass (one step) per frame.

    ``paper``: t/F, t = 1..F. ``deepmind``: linspace(0, 1, F), the initial posterior's
    guess of frame 0 weighted 0 (F - 1 refinements, as ``loss_weights("deepmind", F - 1)``).
    """
    if num_frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {num_frames}")
    return loss_weights(kind, num_frames if kind == "paper" else num_frames - 1)


def step_scale(weight: float, batch_size: int, kl_scale: float = 1.0):
    """Scale of the step-t sites: w_t / B (per-image mean); weight 0 masks the sites.

    `kl_scale` (for the latent site, in model and guide alike) multiplies the step's KL
    term only: beta of a KL-weighted objective such as GECO's (1: the ELBO)."""
    if weight <= 0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=weight * kl_scale / batch_size)


class Plates(NamedTuple):
    """The plates of a program run's sites: ``images`` (dim -2) and ``slots`` (dim -1).

    A latent site sits in both, an image site in ``images`` only. Made once per run of a
    program and entered at every site (Pyro records one site per plate instance)."""

    images: pyro.plate
    slots: pyro.plate


def site_plates(batch_size: int, num_slots: int) -> Plates:
    """`Plates` of B images and K slots: model and guides use these, so their sites line
    up under Pyro's shape checks and under enclosing vectorised plates."""
    return Plates(pyro.plate("images", batch_size, dim=-2), pyro.plate("slots", num_slots, dim=-1))


def sample_shape() -> torch.Size:
    """The sizes of the vectorised plates enclosing a model or guide call, beyond its own
    two (images at -2, slots at -1): ``Predictive(..., parallel=True)``'s samples,
    ``vectorize_particles``'s particles; [] outside them."""
    dims = {f.dim: f.size for f in pyro.poutine.runtime.get_plates()
            if f.vectorized and f.dim is not None and f.dim < -2}
    if not dims:
        return torch.Size()
    return torch.Size(dims.get(d, 1) for d in range(min(dims), -2))


def frame(x: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """The image that step t sees: x itself for images [B, ...], frame t of sequences [B, F, ...].

    Images are [B, C, H, W] (masks [B, G, H, W]); sequences [B, F, C, H, W] ([B, F, G, H, W])."""
    return x[:, t] if x is not None and x.dim() == 5 else x


_systems = itertools.count()
_MEMO = "_iodine_decoded"       # the attribute of a sample that holds its decoding


def _param_prefix() -> str:
    return f"iodine{next(_systems)}"


class IodineModel(nn.Module):
    """p(x, z): prior over K slot latents, decoder, per-pixel mixture likelihood.

    Args:
        cfg: `ModelConfig` (image shape, K, n_z, pixel distribution, prior, decoder).
    """

    amp_dtype: torch.dtype | None = None   # autocast dtype of the decoder (Iodine.use_fast_paths)
    recompute: bool = False                # recompute the likelihood in the backward pass (guide.recompute)
    pixel_scale: float                     # the likelihood's sigma (or Logistic scale) in force: the
                                           # configured one, or where training anneals it, its value
                                           # at the run's step (`iodine_pyro.config.pixel_scale_at`)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_in = cfg.latent_dim + (1 if cfg.decoder_constant is not None else 0)
        if cfg.decoder == "broadcast":
            self.decoder = SpatialBroadcastDecoder(d_in, cfg.image_channels, cfg.image_size,
                                                   cfg.decoder_channels, cfg.decoder_kernel)
        else:
            self.decoder = DeconvDecoder(d_in, cfg.image_channels, cfg.image_size, cfg.deconv_mlp,
                                         cfg.deconv_start, cfg.decoder_channels, cfg.decoder_kernel)
        self.pixel_scale = float(cfg.pixel_scale)
        self.param_prefix = _param_prefix()

    def __setstate__(self, state):
        """A copy (``copy.deepcopy``, unpickling) is another system: its own Pyro names."""
        super().__setstate__(state)
        self.param_prefix = _param_prefix()

    def pyro_name(self, part: str) -> str:
        """The name of `part` (``decoder``, ``guide``) in Pyro's global param store.

        ``pyro.module`` looks parameters up by name in one store per process: under a shared
        name, a second system's trace would use the first system's tensors and an SVI step
        would change none of its own. Each model (and the guide that serves it) has its own
        prefix."""
        return f"{self.param_prefix}/{part}"

    # -- pieces shared with the guide ---------------------------------------------------
    def prior(self, batch_size: int, num_slots: int | None = None, like: torch.Tensor | None = None):
        """N(0, prior_var I) over [B, K, n_z], as a distribution with batch shape [B, K, n_z]."""
        K = num_slots or self.cfg.num_slots
        ref = like if like is not None else next(self.parameters())
        loc = ref.new_zeros(batch_size, K, self.cfg.latent_dim)          # [B, K, n_z]
        return dist.Normal(loc, torch.full_like(loc, self.cfg.prior_var ** 0.5))

    def decode(self, z: torch.Tensor) -> Decoded:
        """Decode all slots of all images in one call; reuse the guide's pass for this z.

        z is [..., B, K, n_z]: leading sample or particle dims pass through to the output."""
        hit = z.__dict__.pop(_MEMO, None)
        if hit is not None and hit[0] == self.param_prefix:
            return hit[1]
        lead, D = z.shape[:-1], z.shape[-1]                     # z: [B, K, n_z]
        flat = z.reshape(-1, D)                                 # [B*K, n_z]
        if self.cfg.decoder_constant is not None:
            const = flat.new_full((flat.shape[0], 1), self.cfg.decoder_constant)
            flat = torch.cat([flat, const], 1)                  # [B*K, n_z + 1]
        with autocast(flat, self.amp_dtype):
            out = self.decoder(flat)                            # [B*K, C + 1, H, W]
        # the likelihood runs in z's precision, on contiguous means and mask logits (the
        # decoder's channels-last output, in one copy with the cast)
        out = out.to(z.dtype, memory_format=torch.contiguous_format)
        out = out.view(*lead, *out.shape[1:])                   # [B, K, C + 1, H, W]
        return Decoded(means=out[..., 1:, :, :], mask_logits=out[..., 0, :, :])

    def remember(self, z: torch.Tensor, decoded: Decoded) -> None:
        """Offer the decoder output of sample `z` to the next `decode(z)` of the same tensor.

        It is kept on `z` itself: it goes when `z` goes, and the first `decode(z)` of this
        model takes it (a copy of z, or another model, decodes afresh)."""
        z.__dict__[_MEMO] = (self.param_prefix, decoded)

    def likelihood(self, decoded: Decoded, recompute: bool = False) -> PixelMixture:
        return PixelMixture(decoded.means, decoded.mask_logits, self.cfg.pixel, self.pixel_scale,
                            recompute=recompute)

    def terms(self, x: torch.Tensor, decoded: Decoded):
        """The per-pixel mixture terms the likelihood is made of (see `mixture_terms`)."""
        return mixture_terms(x, decoded.means, decoded.mask_logits, self.cfg.pixel, self.pixel_scale)

    # -- the Pyro model -----------------------------------------------------------------
    def model(self, *args, **kwargs):
        """Deprecated: the model itself is the Pyro model (``system.model(x, weights)``)."""
        warnings.warn("IodineModel.model is deprecated: call the model itself, system.model(x, ...)",
                      DeprecationWarning, stacklevel=2)
        return self(*args, **kwargs)

    def forward(self, x: torch.Tensor | None = None, weights: list[float] | None = None,
              batch_size: int | None = None, num_slots: int | None = None, kl_scale: float = 1.0):
        """Pyro model: one copy of the generative model per weight (one per refinement step).

        Args:
            x: [B, C, H, W] observed images in [0, 1], or [B, F, C, H, W] sequences (step t
                scores frame t and predicts frame t+1), or None to sample images.
            weights: loss weight per step (default: one step of weight 1).
            batch_size: number of images when `x` is None.
            num_slots: K at test time (default: the configured K).
            kl_scale: weight of the KL terms relative to the likelihood (1: the ELBO).
        Returns:
            the list of per-step `Decoded` outputs.
        """
        pyro.module(self.pyro_name("decoder"), self.decoder)
        weights = weights or [1.0]
        B = x.shape[0] if x is not None else batch_size
        num_frames = x.shape[1] if x is not None and x.dim() == 5 else 0
        K = num_slots or self.cfg.num_slots
        plates, outputs = site_plates(B, K), []
        for t, w in enumerate(weights):
            with plates.images, plates.slots, scope(prefix=f"t{t}"), step_scale(w, B, kl_scale):
                z = pyro.sample("z", self.prior(B, K, like=x).to_event(1))           # [B, K, n_z]
            decoded = self.decode(z)
            pixels = self.likelihood(decoded, self.recompute).over_slots()          # batch [B, 1]
            with plates.images, scope(prefix=f"t{t}"), step_scale(w, B):
                pyro.sample("x", pixels, obs=over_slots(frame(x, t)))                # [B, 1, C, H, W]
                if t + 1 < num_frames:                                              # next-step prediction
                    pyro.sample("x_next", pixels, obs=over_slots(x[:, t + 1]))       # [B, 1, C, H, W]
            outputs.append(decoded)
        return outputs


def over_slots(x: torch.Tensor | None) -> torch.Tensor | None:
    """Images [..., B, C, H, W] as the value of an image site: [..., B, 1, C, H, W]."""
    return None if x is None else x.unsqueeze(-4)


def autocast(like: torch.Tensor, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `like`'s device; nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, dtype=dtype)
