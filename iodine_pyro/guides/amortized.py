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

from ..models.decoders import coordinate_grid
from ..models.generative import IodineModel, autocast, site_plates
from ..nets import conv_stack, mlp, spatial_mean
from .base import Guide, Step

if TYPE_CHECKING:
    from ..config import Config


class AmortizedEncoder(nn.Module):
    """One-shot encoder of the amortized VAE baseline: image -> K slot posteriors.

    The refinement network's conv stack and MLP (same widths, `conv_stack` and `mlp`)
    read the image and the coordinates; after pooling, a linear head emits K * 2 n_z
    parameters.
    """

    def __init__(self, in_channels: int, num_slots: int, out_dim: int,
                 conv_channels: tuple[int, ...], kernel: int, stride: int, mlp_sizes: tuple[int, ...],
                 mlp_linear_last: bool = False):
        super().__init__()
        self.num_slots, self.out_dim = num_slots, out_dim
        self.convs = conv_stack(in_channels, conv_channels, kernel, stride)
        self.mlp = mlp(conv_channels[-1], mlp_sizes, mlp_linear_last)
        self.head = nn.Linear(mlp_sizes[-1] if mlp_sizes else conv_channels[-1], num_slots * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(spatial_mean(self.convs(x)))               # [B, d]
        return self.head(h).view(x.shape[0], self.num_slots, self.out_dim)  # [B, K, 2 n_z]


class AmortizedGuide(Guide):
    """q(z | x) = N(encoder(x)), the encoder built from the refinement network's widths."""

    kind = "amortized"
    description = "q(z | encoder(x)), one encoder pass"

    def __init__(self, model: IodineModel, cfg: Config):
        super().__init__(model, cfg)
        g, m = cfg.guide, cfg.model
        self.encoder = AmortizedEncoder(m.image_channels + 2, m.num_slots, 2 * m.latent_dim,
                                        g.conv_channels, g.conv_kernel, g.conv_stride, g.mlp, g.mlp_linear_last)

    def weights(self, num_iters: int | None = None, sequence: bool = False) -> list[float]:
        """One decoder pass of weight 1, whatever `num_iters`."""
        if sequence:
            raise ValueError("sequences need a guide that reads them one frame per step (the iterative guide)")
        return [1.0]

    def forward(self, x: torch.Tensor, weights: list[float] | None = None,
                batch_size: int | None = None, num_slots: int | None = None,
                kl_scale: float = 1.0) -> list[Step]:
        pyro.module(self.model.pyro_name("guide"), self)
        if num_slots not in (None, self.encoder.num_slots):
            raise ValueError(f"the amortized guide was trained with K={self.encoder.num_slots} "
                             f"and cannot run with K={num_slots}")
        model, training = self.model, torch.is_grad_enabled()
        B, C, H, W = x.shape
        coords = coordinate_grid(H, W, x.device, x.dtype).expand(B, 2, H, W)   # [B, 2, H, W]
        with autocast(x, self.amp_dtype):
            lam = self.encoder(torch.cat([x, coords], 1))                      # [B, K, 2 n_z]
        lam = lam.to(x.dtype)
        z = self.sample(0, 1.0, self.posterior(lam), site_plates(B, self.encoder.num_slots), kl_scale)             # [..., B, K, n_z]
        return [Step(lam, z, self.hand_over(z, model.decode(z), training))]
