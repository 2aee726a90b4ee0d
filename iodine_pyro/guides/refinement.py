"""The refinement network f_phi, the input normalisation of IODINE's guide, and the
posterior's scale parameterisation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nets import channels_last, conv_stack, spatial_mean
from ..nets import mlp as make_mlp


class InputNorm(nn.Module):
    """Layer norm over all non-batch axes of one input, with a per-channel affine.

    Normalises each image-slot's [C, H, W] (or [D]) input to zero mean, unit variance,
    then scales and shifts per channel. The per-channel affine keeps the module
    independent of image size and K, so a trained guide runs at another K or resolution.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))                         # x: [N, C, ...]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, keepdim=True, unbiased=False)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


class RefinementNetwork(nn.Module):
    """conv stack -> global average pool -> MLP -> concat vector inputs -> (LSTM) -> linear.

    Args:
        spatial_channels: channels of the concatenated image-sized inputs.
        vector_dim: size of the concatenated vector inputs (lambda, grad lambda).
        out_dim: 2 * n_z (the update of lambda).
        conv_channels, kernel, stride: the conv stack (ELU after every conv).
        mlp: hidden sizes after pooling (ELU after each; none after the last with
            `mlp_linear_last`).
        lstm: LSTM hidden size, or None for none (Tetrominoes).
    """

    def __init__(self, spatial_channels: int, vector_dim: int, out_dim: int,
                 conv_channels: tuple[int, ...], kernel: int, stride: int,
                 mlp: tuple[int, ...], lstm: int | None, mlp_linear_last: bool = False):
        super().__init__()
        self.convs = conv_stack(spatial_channels, conv_channels, kernel, stride)
        self.mlp = make_mlp(conv_channels[-1], mlp, mlp_linear_last)
        d_in = (mlp[-1] if mlp else conv_channels[-1]) + vector_dim
        self.lstm = nn.LSTMCell(d_in, lstm) if lstm else None
        self.head = nn.Linear(lstm or d_in, out_dim)

    def forward(self, spatial: torch.Tensor, vector: torch.Tensor,
                state: tuple[torch.Tensor, torch.Tensor] | None):
        """spatial: [N, C_in, H, W]; vector: [N, V]; state: LSTM (h, c) or None.

        Returns the update [N, out_dim] and the new state.
        """
        if channels_last(self.convs[0].weight):                 # the convs' layout and dtype, one copy
            device = spatial.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else spatial.dtype
            spatial = spatial.to(dtype, memory_format=torch.channels_last)
        h = self.mlp(spatial_mean(self.convs(spatial)))         # [N, d]
        h = torch.cat([h, vector], 1)                           # [N, d + V]
        if self.lstm is not None:
            state = self.lstm(h, state)                         # ([N, L], [N, L])
            h = state[0]
        return self.head(h), state                              # [N, 2 n_z]


def posterior_scale(s: torch.Tensor, kind: str) -> torch.Tensor:
    """sigma from the unconstrained scale parameter s."""
    if kind == "softplus":
        return F.softplus(s) + 1e-4
    return torch.sqrt(F.softplus(s) + 1e-8)
