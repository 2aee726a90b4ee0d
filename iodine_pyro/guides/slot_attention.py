"""A slot-attention guide: the initial posterior from slot attention, then (optionally) a
few of IODINE's refinement steps (EfficientMORL's direction).

    features = MLP(LayerNorm(CNN(x) + position embedding))      [B, H*W, D]
    slots_0 = mu + sigma * noise, noise ~ N(0, I)              [B, K, S] (a learned Gaussian)
    for i = 1..iters:                                           (Locatello et al., 2020)
        attention = softmax over slots of q(slots) k(features)^T / sqrt(S)
        slots = GRU(weighted mean of v(features), slots); slots += MLP(LayerNorm(slots))
    lambda_1 = linear(slots)                                    [B, K, 2 n_z]
    z_1 ~ q(z | lambda_1)                                       (site "t0/z", as the amortized guide)
    for t = 2..1 + refine_steps: IODINE's refinement step       (site f"t{t-1}/z")

The encoder reads no ELBO gradient; the refinement steps are the iterative guide's own
(its loop, inputs, gradients and network, from ``[guide]``): this guide replaces only
`IterativeGuide.initial_lambda`. The slots
start from independent draws of one Gaussian and compete for pixels through the softmax
over slots, so permuting the initial noise permutes the posteriors, and any K runs.
EfficientMORL reports 6-10x cheaper training steps than IODINE at a similar segmentation.

Its section ``[slot_attention]`` (`SlotAttentionConfig`) sets the encoder and the number of
refinement steps; ``num_iters`` at run time counts decoder passes (1: the encoder only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..fields import integer, integers, odd, ruled
from ..models.decoders import coordinate_grid
from ..models.generative import IodineModel, autocast, loss_weights
from ..nets import conv_stack, pixels
from .base import Guide
from .iterative import IterativeGuide, initial_scale_param

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class SlotAttentionConfig:
    """The slot-attention encoder and the refinement steps after it."""

    iters: int = ruled(3, integer(1))              # slot-attention iterations
    slot_size: int = ruled(64, integer(1))         # S
    mlp_size: int = ruled(128, integer(1))         # hidden size of the slot update MLP
    encoder_channels: tuple[int, ...] = ruled((32, 32, 32, 32), integers())   # CNN, 'same' padding, ReLU
    encoder_kernel: int = ruled(5, odd())
    refine_steps: int = ruled(0, integer(0, 64))   # IODINE refinement steps after the encoder


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al., 2020): slots compete for the inputs over `iters`
    rounds of attention normalised over slots, each followed by a GRU and an MLP update."""

    def __init__(self, in_dim: int, slot_size: int, mlp_size: int, iters: int, eps: float = 1e-8):
        super().__init__()
        self.iters, self.eps, self.scale = iters, eps, slot_size ** -0.5
        self.mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_size)))
        self.log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_size)))
        self.norm_inputs, self.norm_slots, self.norm_mlp = (nn.LayerNorm(d) for d in (in_dim, slot_size, slot_size))
        self.q = nn.Linear(slot_size, slot_size, bias=False)
        self.k = nn.Linear(in_dim, slot_size, bias=False)
        self.v = nn.Linear(in_dim, slot_size, bias=False)
        self.gru = nn.GRUCell(slot_size, slot_size)
        self.mlp = nn.Sequential(nn.Linear(slot_size, mlp_size), nn.ReLU(), nn.Linear(mlp_size, slot_size))

    def forward(self, inputs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """inputs: [B, N, D]; noise: [B, K, S] standard normal. Returns the slots [B, K, S]."""
        B, K, S = noise.shape
        slots = self.mu + self.log_sigma.exp() * noise          # [B, K, S]
        inputs = self.norm_inputs(inputs)
        k, v = self.k(inputs), self.v(inputs)                   # [B, N, S] each
        for _ in range(self.iters):
            q = self.q(self.norm_slots(slots)) * self.scale     # [B, K, S]
            attn = torch.einsum("bks,bns->bkn", q, k).softmax(1) + self.eps   # over slots
            attn = attn / attn.sum(-1, keepdim=True)            # weighted mean over inputs
            updates = torch.einsum("bkn,bns->bks", attn, v)     # [B, K, S]
            slots = self.gru(updates.reshape(B * K, S), slots.reshape(B * K, S)).view(B, K, S)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots


class SlotAttentionEncoder(nn.Module):
    """CNN with a position embedding, then slot attention, then a linear map of each slot to
    lambda = (loc, scale parameter); the scale starts at the prior's sigma."""

    def __init__(self, in_channels: int, out_dim: int, sa: SlotAttentionConfig, scale0: float):
        super().__init__()
        c = sa.encoder_channels[-1]
        self.convs = nn.Sequential(*(nn.ReLU() if isinstance(m, nn.ELU) else m
                                     for m in conv_stack(in_channels, sa.encoder_channels, sa.encoder_kernel)))
        self.position = nn.Linear(4, c)
        self.mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        self.slots = SlotAttention(c, sa.slot_size, sa.mlp_size, sa.iters)
        self.head = nn.Linear(sa.slot_size, out_dim)
        with torch.no_grad():
            self.head.bias[out_dim // 2:] = scale0

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W]; noise: [B, K, S]. Returns lambda [B, K, 2 n_z]."""
        B, _, H, W = x.shape
        grid = coordinate_grid(H, W, x.device, x.dtype)         # [2, H, W] in [-1, 1]
        grid = torch.cat([grid, -grid]).flatten(1).T            # [H*W, 4]: both edges' distances
        h = pixels(self.convs(x))                               # [B, H*W, c]
        h = self.mlp(h + self.position(grid))                   # [B, H*W, c]
        return self.head(self.slots(h, noise))                  # [B, K, 2 n_z]


class SlotAttentionGuide(IterativeGuide):
    """q(z | x) from slot attention, then ``slot_attention.refine_steps`` IODINE steps.

    The refinement machinery (inputs, gradients, network, from ``[guide]``) is the
    iterative guide's; it is built only when there are refinement steps.
    """

    kind = "slot_attention"
    description = "q(z | lambda) of slot attention on x (slots drawn from a learned Gaussian), then refinement"
    refines = False                       # per instance: True with refinement steps
    can_change_slots = True
    reads_sequences = False
    normal = Guide.normal
    section, Section = "slot_attention", SlotAttentionConfig

    def __init__(self, model: IodineModel, cfg: Config):
        super().__init__(model, cfg)
        sa, m = cfg.slot_attention, cfg.model
        del self.lambda0                                        # lambda_1 comes from the encoder
        self.refines = sa.refine_steps > 0
        if not self.refines:
            del self.net, self.norms
        self.steps = 1 + sa.refine_steps
        self.slot_size = sa.slot_size
        scale0 = initial_scale_param(cfg.guide.posterior_scale, m.prior_var)
        self.encoder = SlotAttentionEncoder(m.image_channels, 2 * self.n_z, sa, scale0)

    def weights(self, num_iters: int | None = None, sequence: bool = False) -> list[float]:
        """The paper's weights t / L over L = `num_iters` decoder passes (default: the
        encoder's and the refinement steps'): [1.0] without refinement."""
        if sequence:
            raise ValueError("sequences need a guide that reads them one frame per step (the iterative guide)")
        if num_iters is not None and not self.refines:
            num_iters = 1                                       # no refinement network to run
        return loss_weights("paper", num_iters or self.steps)

    def initial_lambda(self, x: torch.Tensor, num_slots: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """lambda_1 [B, K, 2 n_z] of images x [B, C, H, W] from the slots' initial `noise`
        [B, K, S] (default: a fresh standard-normal draw)."""
        if noise is None:
            noise = torch.randn(x.shape[0], num_slots, self.slot_size, device=x.device, dtype=x.dtype)
        with autocast(x, self.amp_dtype):
            lam = self.encoder(x, noise)                        # [B, K, 2 n_z]
        return lam.to(x.dtype)
