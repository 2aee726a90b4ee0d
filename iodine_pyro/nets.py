"""Building blocks shared by the networks, and their initialisation.

`conv_stack` and `mlp` build the convolution-then-MLP encoders of the refinement network
and of the amortized encoder; `initialise` sets a module's starting weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

INITIALISATIONS = ("torch", "sonnet")


def channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-d tensor (a conv weight, an activation) is stored channels-last
    (`Iodine.use_fast_paths`), and not also contiguous (one channel, or 1x1 images)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def spatial_mean(h: torch.Tensor) -> torch.Tensor:
    """[N, c, H, W] -> [N, c]: the mean over the image. Channels-last h is averaged as the
    [N, H*W, c] it is in memory, so that its gradient comes back channels-last too: the
    gradient of ``h.mean((2, 3))`` is NCHW, and an ELU's backward mixing the two layouts
    takes 7-8 ms instead of 0.3 ms (bf16 [32, 32, 35, 35], one Zen 4 core)."""
    return pixels(h).mean(1) if channels_last(h) else h.mean((2, 3))


def pixels(h: torch.Tensor) -> torch.Tensor:
    """[N, c, H, W] -> [N, H*W, c], a view in either layout (channels-last: in its memory order)."""
    return h.permute(0, 2, 3, 1).flatten(1, 2) if channels_last(h) else h.flatten(2).transpose(1, 2)


def conv_stack(in_channels: int, channels: tuple[int, ...], kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolutions with 'same' padding (stride 1) or halving (stride 2), ELU after each.

    The ELUs act in place on their convolution's output: their backward then reads their
    output instead of their input (bf16 [32, 32, 35, 35] on one Zen 4 core: 0.3 against
    0.8 ms), and the convolution's output is not kept besides."""
    layers, c_in = [], in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, kernel, stride=stride, padding=kernel // 2), nn.ELU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers)


def mlp(in_dim: int, sizes: tuple[int, ...], linear_last: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes, ELU after each (but the last, with `linear_last`)."""
    layers, d_in = [], in_dim
    for i, d in enumerate(sizes):
        layers.append(nn.Linear(d_in, d))
        if not (linear_last and i == len(sizes) - 1):
            layers.append(nn.ELU())
        d_in = d
    return nn.Sequential(*layers)


@torch.no_grad()
def initialise(module: nn.Module, kind: str) -> nn.Module:
    """Set the starting weights of every layer of `module`.

    ``torch``: PyTorch's defaults (uniform, scaled by fan-in), left as they are.
    ``sonnet``: the released IODINE code's (Sonnet 1's defaults): weights from a normal
    of std 1/sqrt(fan_in) truncated at two standard deviations, biases zero; the LSTM's
    gates as one linear map of [input, hidden] with a forget-gate bias of 1. Measured at
    initialisation on the Tetrominoes decoder: its output varies about 4.5 times more
    with z than under PyTorch's defaults.
    """
    if kind == "torch":
        return module
    if kind != "sonnet":
        raise ValueError(f"unknown initialisation {kind!r}; choose from {INITIALISATIONS}")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) \
                else m.weight.shape[0] * m.weight[0, 0].numel()
            _truncated_normal(m.weight, 1.0 / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LSTMCell):
            std = 1.0 / math.sqrt(m.input_size + m.hidden_size)
            _truncated_normal(m.weight_ih, std)
            _truncated_normal(m.weight_hh, std)
            m.bias_ih.zero_()
            m.bias_hh.zero_()
            m.bias_ih[m.hidden_size:2 * m.hidden_size] = 1.0      # gates i, f, g, o: forget bias 1
    return module


def _truncated_normal(t: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
