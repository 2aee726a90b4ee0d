"""Decoder networks: z_k -> (mask logit, means) for every slot, all slots in one call."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nets import channels_last


def coordinate_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """[2, H, W]: row then column coordinates, each linspace(-1, 1)."""
    rows = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # [2, H, W]
    return grid


def edge_patterns(size: int, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which taps of a 'same' convolution's kernel fall inside the image, along one axis.

    Returns (taps [P, kernel], pattern [size]): the distinct 0/1 rows of "tap i of position
    h falls inside" (0 <= h + i - kernel // 2 < size), and each position's row among them.
    """
    # found on the CPU (`torch.unique` needs values: not on the meta device, on which
    # `memory.parameter_count` builds the networks), then put on the default device
    pos = torch.arange(size, device="cpu")[:, None] + torch.arange(kernel, device="cpu")[None, :] - kernel // 2
    inside = ((pos >= 0) & (pos < size)).float()                # [size, kernel]
    taps, pattern = torch.unique(inside, dim=0, return_inverse=True)
    device = torch.get_default_device()
    return taps.to(device), pattern.to(device)


def cosine_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """[8, H, W]: cos(i pi u) cos(j pi v) for i, j in {0, 1, 2} without (0, 0), u, v in [0, 1]."""
    u = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype)[:, None]   # [H, 1]
    v = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype)[None, :]    # [1, W]
    feats = [torch.cos(i * math.pi * u) * torch.cos(j * math.pi * v)
             for i in range(3) for j in range(3) if (i, j) != (0, 0)]
    return torch.stack(feats)                                                   # [8, H, W]


class SpatialBroadcastDecoder(nn.Module):
    """Spatial broadcast decoder (Watters et al., 2019).

    z is tiled over H x W, two coordinate channels are appended, and a stack of
    stride-1 'same' convolutions with ELU maps it to C + 1 channels without activation:
    one mask logit then C means.

    Args:
        latent_dim: size of the decoder input (n_z, plus 1 with a constant appended).
        out_channels: image channels C (the network outputs C + 1).
        image_size: (H, W).
        channels: hidden conv widths.
        kernel: conv kernel size (odd).
    """

    def __init__(self, latent_dim: int, out_channels: int, image_size: tuple[int, int],
                 channels: tuple[int, ...], kernel: int):
        super().__init__()
        self.image_size = tuple(image_size)
        # ELUs in place: their backward then reads their output, not their input (bf16,
        # [32, 32, 35, 35], one Zen 4 core: 0.3 against 0.8 ms), and no input is kept. Not
        # the first: it acts on `first_layer`'s output, a view in channels-last layout, and
        # in place on a view autograd copies the whole gradient back (19 ms a step).
        layers, c_in = [], latent_dim + 2
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, kernel, padding=kernel // 2), nn.ELU(inplace=i > 0)]
            c_in = c
        layers.append(nn.Conv2d(c_in, out_channels + 1, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)
        self.register_buffer("coords", coordinate_grid(*self.image_size), persistent=False)
        for name, size in (("row", self.image_size[0]), ("col", self.image_size[1])):
            taps, pattern = edge_patterns(size, kernel)
            self.register_buffer(f"{name}_taps", taps, persistent=False)          # [P, k]
            self.register_buffer(f"{name}_pattern", pattern, persistent=False)    # [size]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if len(self.net) == 1:                                  # no hidden layers
            return self.first_layer(z)                          # [N, C + 1, H, W]
        return self.last_layer(self.net[1:-1](self.first_layer(z)))   # [N, C + 1, H, W]

    def first_layer(self, z: torch.Tensor) -> torch.Tensor:
        """The first conv of the broadcast input, without broadcasting z.

        conv(cat[tile(z), coords]) is linear in its input, and tile(z) is constant over
        the image, so the z part is sum_d z_d A_d with A_d(h, w) the sum of the kernel
        taps of channel d that fall inside the image at (h, w) (zero padding). Which taps
        fall inside depends on the row only through its distance to the top and bottom
        edges, and likewise for columns: with k = 5, 5 row and 5 column patterns
        (`edge_patterns`), so A_d takes 25 values, computed once per pattern and then
        gathered onto the image. The same numbers as convolving the tiled input (to
        rounding), at a small fraction of its cost; against the sum of the taps over every
        pixel (a [n_z, C1 * H * W] matrix) a `fast` Tetrominoes step 2% cheaper.
        """
        conv = self.net[0]
        N, D = z.shape                                          # z: [N, D]
        C1, k = conv.out_channels, conv.kernel_size[0]
        w_z, w_xy = conv.weight[:, :D], conv.weight[:, D:]      # [C1, D, k, k], [C1, 2, k, k]
        xy = F.conv2d(self.coords.to(z.dtype)[None], w_xy, conv.bias, padding=k // 2)[0]   # [C1, H, W]
        rows, cols = (p.to(w_z.dtype) for p in (self.row_taps, self.col_taps))    # [P, k], [Q, k]
        P, Q = rows.shape[0], cols.shape[0]
        if channels_last(conv.weight):                          # the layout the next convs use
            taps = torch.einsum("cdij,pi,qj->dpqc", w_z, rows, cols).reshape(D, P * Q * C1)
            a = (z @ taps).view(N, P, Q, C1)                    # A at every pattern pair
            a = a.index_select(1, self.row_pattern).index_select(2, self.col_pattern)   # [N, H, W, C1]
            return (a + xy.permute(1, 2, 0)).permute(0, 3, 1, 2)   # [N, C1, H, W], channels-last
        taps = torch.einsum("cdij,pi,qj->dcpq", w_z, rows, cols).reshape(D, C1 * P * Q)
        a = (z @ taps).view(N, C1, P, Q)
        a = a.index_select(2, self.row_pattern).index_select(3, self.col_pattern)       # [N, C1, H, W]
        return a + xy                                           # [N, C1, H, W]

    def last_layer(self, h: torch.Tensor) -> torch.Tensor:
        """The last conv (hidden -> C + 1 channels). In channels-last layout, as the transposed
        convolution with the flipped kernel (the same map): oneDNN's weight gradient of the
        convolution is 2.7 times slower for so few output channels (bf16, [32, 32, 35, 35]
        into 4 channels, one Zen 4 core: 5.2 against 1.9 ms; forward and input gradient the
        same). In NCHW the transposed convolution's forward is 3 times slower: the plain
        convolution there."""
        conv = self.net[-1]
        if not channels_last(conv.weight):
            return conv(h)
        k = conv.kernel_size[0]
        return F.conv_transpose2d(h, conv.weight.flip(2, 3).transpose(0, 1), conv.bias, padding=k // 2)

    def forward_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Reference: the decoder applied to the explicitly tiled input."""
        N, D = z.shape
        H, W = self.image_size
        tiled = z[:, :, None, None].expand(N, D, H, W)          # [N, D, H, W]
        coords = self.coords.to(z.dtype).expand(N, 2, H, W)     # [N, 2, H, W]
        return self.net(torch.cat([tiled, coords], 1))          # [N, C + 1, H, W]


class DeconvDecoder(nn.Module):
    """The paper's deconvolution decoder (Sec. 4.3 ablation).

    MLP, reshape to (c, h, w), transposed convs of stride 2 with ELU, then a conv to
    C + 1 channels. When the upsampled size differs from the image size the output is
    resized bilinearly.
    """

    def __init__(self, latent_dim: int, out_channels: int, image_size: tuple[int, int],
                 mlp: tuple[int, ...], start: tuple[int, int, int], channels: tuple[int, ...],
                 kernel: int):
        super().__init__()
        self.image_size = tuple(image_size)
        self.start = tuple(start)
        dims = [latent_dim, *mlp, math.prod(start)]
        mlp_layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            mlp_layers += [nn.Linear(a, b), nn.ELU()]
        self.mlp = nn.Sequential(*mlp_layers)
        layers, c_in = [], start[0]
        for c in channels:
            layers += [nn.ConvTranspose2d(c_in, c, kernel, stride=2, padding=kernel // 2,
                                          output_padding=1), nn.ELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, out_channels + 1, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mlp(z).view(z.shape[0], *self.start)          # [N, c, h, w]
        out = self.net(h)                                       # [N, C + 1, h', w']
        if tuple(out.shape[-2:]) != self.image_size:
            out = F.interpolate(out, size=self.image_size, mode="bilinear", align_corners=False)
        return out                                              # [N, C + 1, H, W]
