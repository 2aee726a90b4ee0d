"""A plain amortized VAE guide for the IODINE model: one encoder pass, no refinement.

    lambda = encoder(x, coordinates)      [B, K, 2 n_z] in one shot
    z ~ q(z | lambda)                     (site "t0/z", the same site as the first IODINE step)

It shares the model, its decoder and its likelihood with the iterative guide, so the
two differ only in how lambda is computed: the baseline for what refinement buys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import torch
import torch.nn as nn
from pyro.contrib.autoname import scope
from torch.distributions import Normal

from ..models.decoders import coordinate_grid
from ..models.iodine import Decoded, IodineModel, autocast, step_scale
from .iodine import Step
from .refinement import AmortizedEncoder, posterior_scale

if TYPE_CHECKING:
    from ..config import Config


class AmortizedGuide(nn.Module):
    """q(z | x) = N(encoder(x)), the encoder built from the refinement network's widths."""

    amp_dtype: torch.dtype | None = None   # autocast dtype of the encoder (Iodine.use_fast_paths)

    def __init__(self, model: IodineModel, cfg: Config):
        super().__init__()
        self.__dict__["model"] = model            # a reference, not a child module
        g, m = cfg.guide, cfg.model
        self.cfg, self.n_z = g, m.latent_dim
        self.encoder = AmortizedEncoder(m.image_channels + 2, m.num_slots, 2 * m.latent_dim,
                                        g.conv_channels, g.conv_kernel, g.conv_stride, g.mlp)
        self.default_weights = [1.0]

    def posterior(self, lam: torch.Tensor) -> Normal:
        loc, s = lam.split(self.n_z, -1)                        # [B, K, n_z] each
        return Normal(loc, posterior_scale(s, self.cfg.posterior_scale))

    def forward(self, x: torch.Tensor, weights: list[float] | None = None,
                batch_size: int | None = None, num_slots: int | None = None,
                kl_scale: float = 1.0) -> list[Step]:
        pyro.module("guide", self)
        if num_slots not in (None, self.encoder.num_slots):
            raise ValueError(f"the amortized guide was trained with K={self.encoder.num_slots} "
                             f"and cannot run with K={num_slots}")
        model, training = self.model, torch.is_grad_enabled()
        B, C, H, W = x.shape
        model.forget()
        coords = coordinate_grid(H, W, x.device, x.dtype).expand(B, 2, H, W)   # [B, 2, H, W]
        with autocast(x, self.amp_dtype):
            lam = self.encoder(torch.cat([x, coords], 1))                      # [B, K, 2 n_z]
        lam = lam.to(x.dtype)
        q = self.posterior(lam)
        with pyro.plate("images", B), scope(prefix="t0"), step_scale(1.0, B, kl_scale):
            z = pyro.sample("z", pyro.distributions.Normal(q.loc, q.scale).to_event(2))
        decoded = model.decode(z)
        if not training:
            decoded = Decoded(decoded.means.detach(), decoded.mask_logits.detach())
        model.remember(z, decoded)
        return [Step(lam, z, decoded)]
