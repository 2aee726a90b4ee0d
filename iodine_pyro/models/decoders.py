"""Decoder networks: z_k -> (mask logit, means) for every slot, all slots in one call."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def coordinate_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """[2, H, W]: row then column coordinates, each linspace(-1, 1)."""
    rows = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # [2, H, W]
    return grid


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
        layers, c_in = [], latent_dim + 2
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel, padding=kernel // 2), nn.ELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, out_channels + 1, kernel, padding=kernel // 2))
        self.net = nn.Sequential(*layers)
        self.register_buffer("coords", coordinate_grid(*self.image_size), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net[1:](self.first_layer(z))                # [N, C + 1, H, W]

    def first_layer(self, z: torch.Tensor) -> torch.Tensor:
        """The first conv of the broadcast input, without broadcasting z.

        conv(cat[tile(z), coords]) is linear in its input, and tile(z) is constant over
        the image, so the z part is sum_d z_d A_d with A_d(h, w) the sum of the kernel
        taps of channel d that fall inside the image at (h, w) (zero padding). The same
        numbers as convolving the tiled input, at a small fraction of its cost.
        """
        conv = self.net[0]
        N, D = z.shape                                          # z: [N, D]
        H, W = self.image_size
        C1, k = conv.out_channels, conv.kernel_size[0]
        w_z, w_xy = conv.weight[:, :D], conv.weight[:, D:]      # [C1, D, k, k], [C1, 2, k, k]
        ones = z.new_ones(1, 1, H, W)
        taps = F.conv2d(ones, w_z.reshape(C1 * D, 1, k, k), padding=k // 2)    # [1, C1*D, H, W]
        taps = taps.view(C1, D, H * W).transpose(0, 1).reshape(D, C1 * H * W)  # [D, C1*H*W]
        xy = F.conv2d(self.coords.to(z.dtype)[None], w_xy, conv.bias, padding=k // 2)  # [1, C1, H, W]
        return (z @ taps).view(N, C1, H, W) + xy                # [N, C1, H, W]

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
