"""The refinement network's inputs as one table.

Every input IODINE's refinement network can read is one row of `INPUTS`: its name, its
size, whether it is layer-normed, which gradient of the step's ELBO it needs, and how it
is computed. Presets choose inputs by name (``guide.inputs``) and which of them are
stop-gradient (``guide.stop_gradient``); the guide iterates this table and nothing else.

A row's `compute` receives a `Context` and returns

* an image-sized input as [B, K or 1, c, H, W] (1: the same for every slot, tiled later),
* a vector input as [B, K, c].

Adding an input is one function and one row here (and its name in a preset).

The configuration validates input names against this table, and the command line imports
the configuration at start-up: so this module imports no torch at its top; the few
functions that need torch's namespace import it when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

if TYPE_CHECKING:
    import torch

# Which gradient of the step's -ELBO an input needs (`Context.grads` keys).
GRAD_LAMBDA, GRAD_MEANS, GRAD_MASK_LOGITS = "lam", "means", "mask_logits"


class Context(NamedTuple):
    """What one refinement step knows when it builds its inputs."""

    x: torch.Tensor             # [B, C, H, W] the image (or frame) of this step
    lam: torch.Tensor           # [B, K, 2 n_z] posterior parameters
    means: torch.Tensor         # [B, K, C, H, W] decoded means
    mask_logits: torch.Tensor   # [B, K, H, W]
    terms: "object"             # MixtureTerms: log_px [B, H, W], comp, log_masks [B, K, H, W]
    grads: dict                 # {"lam": [B, K, 2 n_z], "means": [B, K, C, H, W], "mask_logits": [B, K, H, W]}
    mask_posterior: str         # "responsibility" | "normalized_likelihood"


@dataclass(frozen=True)
class Input:
    """One row of the table.

    Attributes:
        name: the name presets and ablations use.
        spatial: image-sized (read by the conv stack) or a vector (joined after pooling).
        channels: its size given (image channels C, latent size n_z).
        layer_norm: normalised per image-slot by an `InputNorm` before use.
        needs: the gradient of the step's -ELBO it is made of, or None.
        compute: `Context` -> tensor (see the module docstring for shapes).
        doc: what it is, in the paper's words.
    """

    name: str
    spatial: bool
    channels: Callable[[int, int], int]
    layer_norm: bool
    needs: str | None
    compute: Callable[[Context], torch.Tensor]
    doc: str


def _mask_posterior(c: Context) -> torch.Tensor:
    if c.mask_posterior == "responsibility":                     # p(m_k | x, mu)
        return (c.terms.log_masks + c.terms.comp).softmax(1).unsqueeze(2)   # [B, K, 1, H, W]
    p = c.terms.comp.exp()                                       # p_k(x) / (sum_j p_j(x) + 1e-6)
    return (p / (p.sum(1, keepdim=True) + 1e-6)).unsqueeze(2)


def _leave_one_out(c: Context) -> torch.Tensor:
    loo = leave_one_out(c.mask_logits, c.terms.comp)             # [B, K, H, W]
    return (c.terms.log_px.unsqueeze(1) - loo).unsqueeze(2)      # [B, K, 1, H, W]


def _coordinates(c: Context) -> torch.Tensor:
    from ..models.decoders import coordinate_grid   # torch on use (see the module docstring)
    return coordinate_grid(*c.x.shape[-2:], c.x.device, c.x.dtype)[None, None]   # [1, 1, 2, H, W]


def _cos_coordinates(c: Context) -> torch.Tensor:
    from ..models.decoders import cosine_grid       # torch on use (see the module docstring)
    return cosine_grid(*c.x.shape[-2:], c.x.device, c.x.dtype)[None, None]      # [1, 1, 8, H, W]


def _image_channels(C: int, n_z: int) -> int:
    return C


def _one(C: int, n_z: int) -> int:
    return 1


def _lambda_size(C: int, n_z: int) -> int:
    return 2 * n_z


INPUTS: dict[str, Input] = {row.name: row for row in [
    Input("image", True, _image_channels, False, None,
          lambda c: c.x.unsqueeze(1), "the image x"),
    Input("means", True, _image_channels, False, None,
          lambda c: c.means, "the slot's means mu_k"),
    Input("mask", True, _one, False, None,
          lambda c: c.terms.log_masks.exp().unsqueeze(2), "the slot's mask pi_k (softmax over slots)"),
    Input("mask_logits", True, _one, False, None,
          lambda c: c.mask_logits.unsqueeze(2), "the decoder's mask logit m_k"),
    Input("mask_posterior", True, _one, False, None,
          _mask_posterior, "p(m_k | x, mu), or the released code's normalised component likelihood"),
    Input("grad_means", True, _image_channels, True, GRAD_MEANS,
          lambda c: c.grads[GRAD_MEANS], "dL/dmu_k"),
    Input("grad_mask", True, _one, True, GRAD_MASK_LOGITS,
          lambda c: c.grads[GRAD_MASK_LOGITS].unsqueeze(2), "dL/dm_k (the mask logits)"),
    Input("likelihood", True, _one, True, None,
          lambda c: c.terms.log_px[:, None, None], "log p(x | z) per pixel"),
    Input("leave_one_out", True, _one, True, None,
          _leave_one_out, "log p(x | z) - log p(x | z_{i != k})"),
    Input("coordinates", True, lambda C, n_z: 2, False, None,
          _coordinates, "row and column in [-1, 1]"),
    Input("capacity", True, _one, False, None,
          lambda c: c.x.new_full((1, 1, 1, *c.x.shape[-2:]), 0.5), "a constant 0.5 (released code)"),
    Input("cos_coordinates", True, lambda C, n_z: 8, False, None,
          _cos_coordinates, "cos(i pi u) cos(j pi v), i, j in {0, 1, 2} but (0, 0) (released code)"),
    Input("posterior", False, _lambda_size, False, None,
          lambda c: c.lam, "the posterior parameters lambda_k"),
    Input("grad_posterior", False, _lambda_size, True, GRAD_LAMBDA,
          lambda c: c.grads[GRAD_LAMBDA], "dL/dlambda_k"),
]}

# The appendix's table: 17 image channels (for C = 3) and the two vector inputs.
PAPER_INPUTS = ("image", "means", "mask", "mask_logits", "mask_posterior", "grad_means", "grad_mask",
                "likelihood", "leave_one_out", "coordinates", "posterior", "grad_posterior")
# The appendix's SG column; DeepMind's DEFAULT_STOP_GRADIENT (dcomponents, dmask, log_prob,
# counterfactual, dzp) names the same five inputs.
PAPER_STOP_GRADIENT = ("grad_means", "grad_mask", "likelihood", "leave_one_out", "grad_posterior")


def leave_one_out(mask_logits: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """log p(x | z_{i != k}): the mixture of the other K-1 slots, masks renormalised.

    Args:
        mask_logits, comp: [B, K, H, W]. Returns [B, K, H, W] (zeros when K = 1).
    """
    B, K, H, W = comp.shape
    if K == 1:
        return comp.new_zeros(comp.shape)
    drop = comp.new_ones(K).diag().bool()[None, :, :, None, None]   # [1, K, K, 1, 1]

    def lse_without(v):                                        # v: [B, K, H, W]
        vv = v.unsqueeze(1).expand(B, K, K, H, W).masked_fill(drop, float("-inf"))
        return vv.logsumexp(2)                                  # [B, K, H, W]

    return lse_without(mask_logits + comp) - lse_without(mask_logits)
