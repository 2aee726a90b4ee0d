"""The pixel likelihood: a per-pixel mixture over slots.

p(x_hw | z) = sum_k pi_khw prod_c p(x_hwc | mu_khwc),  pi_hw = softmax_k(m_hw)

One function, `mixture_terms`, computes it; the model scores observations through the
`PixelMixture` distribution built on it and the guide differentiates the very same
function for its refinement inputs. Nothing else in the package evaluates p(x | z).

Every function here counts dimensions from the right (slots at -4 of the means, -3 of
the masks), so any leading dimensions (Pyro's sample and particle dimensions in front
of the images) pass through: shapes below write [B, ...] for [..., B, ...].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch.utils.checkpoint import checkpoint


def component_log_prob(x: torch.Tensor, means: torch.Tensor, pixel: str, scale: float) -> torch.Tensor:
    """log p(x_hwc | mu_khwc) summed over channels.

    Args:
        x: [B, C, H, W] image.
        means: [B, K, C, H, W] per-slot means.
        pixel: "gaussian" (scale = sigma) or "logistic" (scale = s).
    Returns:
        [B, K, H, W]
    """
    u = (x.unsqueeze(-4) - means) / scale                      # u: [B, K, C, H, W]
    if pixel == "gaussian":
        lp = -0.5 * u * u - math.log(scale) - 0.5 * math.log(2 * math.pi)
    elif pixel == "logistic":
        lp = -u - math.log(scale) - 2.0 * F.softplus(-u)
    else:
        raise ValueError(f"unknown pixel distribution {pixel!r}")
    return lp.sum(-3)                                          # [B, K, H, W]


def reconstruction(means: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The mixture's mean image sum_k pi_k mu_k: means [B, K, C, H, W], masks [B, K, H, W]
    -> [B, C, H, W]."""
    return (masks.unsqueeze(-3) * means).sum(-4)


class MixtureTerms(NamedTuple):
    log_px: torch.Tensor      # [B, H, W]     log p(x_hw | z)
    comp: torch.Tensor        # [B, K, H, W]  log p(x_hw | mu_k) (channels summed)
    log_masks: torch.Tensor   # [B, K, H, W]  log pi_k


def mixture_terms(x: torch.Tensor, means: torch.Tensor, mask_logits: torch.Tensor,
                  pixel: str, scale: float) -> MixtureTerms:
    """Per-pixel mixture log-likelihood and its parts.

    Args:
        x: [B, C, H, W]; means: [B, K, C, H, W]; mask_logits: [B, K, H, W].
    """
    comp = component_log_prob(x, means, pixel, scale)          # [B, K, H, W]
    log_masks = F.log_softmax(mask_logits, dim=-3)             # [B, K, H, W]
    log_px = torch.logsumexp(log_masks + comp, dim=-3)         # [B, H, W]
    return MixtureTerms(log_px, comp, log_masks)


class PixelMixture(TorchDistribution):
    """Images as independent per-pixel mixtures over K slots.

    batch_shape = the means' dims before [K, C, H, W] ([B] for a batch of images, [S, B]
    under a sample or particle plate), event_shape = [C, H, W]. ``log_prob`` sums the per-pixel
    mixture log-likelihood of `mixture_terms` over pixels; ``sample`` draws a slot per
    pixel from pi and then each channel from that slot's component. With `recompute`,
    ``log_prob`` keeps only its inputs for the backward pass and recomputes the mixture
    terms there (``torch.utils.checkpoint``), so scoring T steps stores no [B, K, ...]
    intermediates per step.
    """

    arg_constraints = {"means": constraints.real, "mask_logits": constraints.real}
    support = constraints.independent(constraints.real, 3)    # an image [C, H, W] per event
    has_rsample = False

    def __init__(self, means: torch.Tensor, mask_logits: torch.Tensor, pixel: str = "gaussian",
                 scale: float = 0.1, validate_args=None, recompute: bool = False):
        self.means = means                                     # [B, K, C, H, W]
        self.mask_logits = mask_logits                         # [B, K, H, W]
        self.pixel = pixel
        self.scale = float(scale)
        self.recompute = recompute
        if means.dim() < 5 or mask_logits.shape[-3:] != means.shape[-4:-3] + means.shape[-2:]:
            raise ValueError(f"PixelMixture needs means [..., K, C, H, W] and mask logits [..., K, H, W], "
                             f"got {tuple(means.shape)} and {tuple(mask_logits.shape)}")
        batch = torch.broadcast_shapes(means.shape[:-4], mask_logits.shape[:-3])
        super().__init__(batch, means.shape[-3:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:                    # what the images plate asks for
            return self
        return PixelMixture(self.means.expand(batch_shape + self.means.shape[-4:]),
                            self.mask_logits.expand(batch_shape + self.mask_logits.shape[-3:]),
                            self.pixel, self.scale, recompute=self.recompute)

    def over_slots(self) -> "PixelMixture":
        """The same images with a singleton slot dimension in the batch, [..., B] ->
        [..., B, 1]: the distribution of an image site, which sits in the ``images`` plate
        (dim -2) but not in ``slots`` (Pyro's nested-plate convention)."""
        return PixelMixture(self.means.unsqueeze(-5), self.mask_logits.unsqueeze(-4), self.pixel, self.scale,
                            validate_args=self._validate_args, recompute=self.recompute)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)                       # shape and finiteness of the images
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._log_prob, value, self.means, self.mask_logits, use_reentrant=False)
        return self._log_prob(value, self.means, self.mask_logits)

    def _log_prob(self, value, means, mask_logits) -> torch.Tensor:
        terms = mixture_terms(value, means, mask_logits, self.pixel, self.scale)
        return terms.log_px.sum((-2, -1))                      # batch_shape

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape    # [S..., B]
        with torch.no_grad():
            K, C, H, W = self.means.shape[-4:]
            logits = self.mask_logits.expand(self.batch_shape + (K, H, W)).movedim(-3, -1)  # [B, H, W, K]
            k = torch.distributions.Categorical(logits=logits).sample(sample_shape)        # [S..., B, H, W]
            idx = k[..., None, None, :, :].expand(*shape, 1, C, H, W)                     # [S..., B, 1, C, H, W]
            means = self.means.expand(shape + (K, C, H, W))                                # [S..., B, K, C, H, W]
            mu = means.gather(-4, idx).squeeze(-4)             # [S..., B, C, H, W]
            if self.pixel == "gaussian":
                noise = torch.randn_like(mu)
            else:
                u = torch.rand_like(mu).clamp(1e-6, 1 - 1e-6)
                noise = torch.log(u) - torch.log1p(-u)         # standard Logistic
            return mu + self.scale * noise                     # [B, C, H, W]

    @property
    def mean(self) -> torch.Tensor:
        return reconstruction(self.means, self.mask_logits.softmax(-3))  # [B, C, H, W]
