"""AIR-net's generator and critic (seed 001, Yan et al. 2018, section 2.1): one body, two heads.

Body: a 3x3 convolution dilated by 2, two 3x3 convolutions of stride 2, a residual block
of three convolutions, a 1x1 convolution down to 8 channels, then a fully connected layer
of 256 units and the output layer; ReLU after every layer but the last. The generator's
output is the transform's parameters (6 rigid, 12 affine); the critic's is one score.

`dims=3` convolves the volume in 3D; `dims=2` is the paper's own variant, which treats
the slices of each volume as channels of a 2D image (input `[B, 2K, J, I]`), so a deeper,
wider network fits one GPU. The paper's width is 128; on a CPU we train narrower ones
(`width` is in the model card).

The critic has no output activation: the paper names a sigmoid, but a Wasserstein critic
is an unbounded score (Arjovsky et al.); its raw value is the D-score.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REDUCED_CHANNELS = 8
HIDDEN = 256


class ResidualBlock(nn.Module):
    def __init__(self, conv, width: int):
        super().__init__()
        self.convs = nn.ModuleList(conv(width, width, 3, padding=1) for _ in range(3))

    def forward(self, x):
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y)
            y = torch.relu(y) if i < len(self.convs) - 1 else y
        return torch.relu(x + y)


class AirNet(nn.Module):
    """Generator (`outputs` = 6 or 12) or critic (`outputs` = 1) of a two-image input of `shape` (K, J, I)."""

    def __init__(self, shape, outputs: int, width: int = 32, dims: int = 3):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 (slices as channels) or 3, got {dims}")
        self.shape, self.dims = tuple(int(s) for s in shape), dims
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        in_channels = 2 if dims == 3 else 2 * self.shape[0]
        self.features = nn.Sequential(
            conv(in_channels, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            conv(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            conv(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            ResidualBlock(conv, width),
            conv(width, REDUCED_CHANNELS, 1),
            nn.ReLU(),
        )
        spatial = self.shape if dims == 3 else self.shape[1:]
        reduced = math.prod(math.ceil(math.ceil(s / 2) / 2) for s in spatial)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(REDUCED_CHANNELS * reduced, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, outputs)
        )

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        """`fixed`, `warped`: `[B, 1, K, J, I]` on the same grid; returns `[B, outputs]`."""
        x = torch.cat([fixed, warped], dim=1)
        if self.dims == 2:
            x = x.flatten(1, 2)  # [B, 2K, J, I]: each volume's slices as channels
        return self.head(self.features(x))
