"""A small 3D encoder-decoder with skip connections that outputs a 3-channel field.

The generator of seed 003 (Laves et al., deep image prior registration), after
Lempitsky et al.'s DIP hourglass: each encoder level halves the size with a
stride-2 3x3x3 convolution, each decoder level upsamples trilinearly to the
skip's exact size (so any volume size works, odd ones included), concatenates
the skip and convolves. LeakyReLU everywhere except the output convolution,
which is linear (a displacement has a sign).

Initialisation, as in seed 003: every weight ~ N(0, 0.01) (std 0.01), biases 0.
With such small weights the output starts close to 0, i.e. the optimisation
starts near the identity warp. `init_std=None` keeps PyTorch's default
initialisation instead: the gland segmenters (`methods/glands.py`) are trained
networks, and N(0, 0.01) weights make a deep stack's activations vanish (DIP's
default network, `methods/dip.py`, takes that too, with a near-zero output layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class UNet3D(nn.Module):
    """`[B, in_channels, K, J, I]` -> `[B, out_channels, K, J, I]`, fully convolutional.

    `channels[0]` is the full-resolution width; each further entry adds one
    stride-2 level (so `(16, 32, 32, 32)` downsamples three times, to 1/8).
    """

    def __init__(self, in_channels: int = 8, out_channels: int = 3, channels=(16, 32, 32, 32), init_std: float | None = 0.01):
        super().__init__()
        channels = tuple(channels)
        self.inc = _block(in_channels, channels[0])
        self.down = nn.ModuleList(_block(a, b, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        # Decoder level l takes the upsampled level l+1 (width channels[l+1]) plus the skip (channels[l]).
        self.up = nn.ModuleList(_block(channels[i + 1] + channels[i], channels[i]) for i in range(len(channels) - 1))
        self.out = nn.Conv3d(channels[0], out_channels, 3, padding=1)
        if init_std is not None:
            self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.01) -> None:
        """Seed 003's initialisation: weights ~ N(0, std), biases zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[2:], mode="trilinear", align_corners=False)
            y = up(torch.cat([y, skip], dim=1))
        return self.out(y)
