"""Seed 004's network (Estienne et al.): a shared encoder, fusion by subtraction, a decoder of spatial gradients.

Each image passes alone through the encoder E; at every level the two encodings are
subtracted, and the decoder D turns the differences into the spatial gradients of
the deformation. One network gives both directions with the same weights:
`D(E(M) - E(F))` for moving -> fixed and `D(E(F) - E(M))` for fixed -> moving.

Blocks follow the paper's description: normalisation, LeakyReLU, 3x3x3 convolution,
then a convolution with kernel and stride 2 to halve the size. The paper's widths
are 64-128-256-512 (20 M parameters, GPUs); `channels` sets them, and the shipped
model's card says which it used.

Deep supervision: every decoder level below the finest also has a head, and the
trainer scores the fields of all heads (`forward` returns them finest first).
A head outputs `2 * sigmoid(.)`, a gradient in (0, 2): positive, so the integrated
grid never folds along an axis, and 1 at zero output, the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.InstanceNorm3d(cin, affine=True), nn.LeakyReLU(0.2), nn.Conv3d(cin, cout, 3, padding=1))


class SymNet(nn.Module):
    """`(fixed, moving)` `[B, 1, K, J, I]` -> spatial gradients `[B, 3, k, j, i]` per head, both directions.

    K, J and I must divide by `2 ** (len(channels) - 1)`. Head `h` (0 = finest) is at
    `1 / 2 ** (h + output_level)` of the input size.
    """

    def __init__(self, channels=(8, 16, 32, 64), output_level: int = 0, heads: int = 3):
        super().__init__()
        channels = tuple(channels)
        if not 0 <= output_level < len(channels) - 1:
            raise ValueError(f"output_level must be in [0, {len(channels) - 2}], got {output_level}")
        self.channels, self.output_level = channels, output_level
        self.stem = nn.Conv3d(1, channels[0], 3, padding=1)
        self.enc = nn.ModuleList(_conv_block(channels[i], channels[i]) for i in range(len(channels)))
        self.down = nn.ModuleList(nn.Conv3d(a, b, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        # Decoder level l (from the bottom up) takes the upsampled coarser features and the skip difference.
        self.dec = nn.ModuleList(
            nn.Sequential(_conv_block(channels[l + 1] + channels[l], channels[l]), _conv_block(channels[l], channels[l]))
            for l in range(output_level, len(channels) - 1)
        )
        levels = list(range(output_level, len(channels) - 1))[: max(heads, 1)]
        self.head_levels = levels
        self.heads = nn.ModuleList(nn.Conv3d(channels[l], 3, 1) for l in levels)
        for head in self.heads:  # start at the identity: zero output, gradient 1
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Features at every level, finest first."""
        x = self.stem(image)
        feats = []
        for i, block in enumerate(self.enc):
            x = block(x)
            feats.append(x)
            if i < len(self.down):
                x = self.down[i](x)
        return feats

    def decode(self, diffs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Spatial gradients in (0, 2) from every head, finest first."""
        y = diffs[-1]
        out = {}
        for l in reversed(range(self.output_level, len(self.channels) - 1)):
            y = F.interpolate(y, size=diffs[l].shape[2:], mode="trilinear", align_corners=False)
            y = self.dec[l - self.output_level](torch.cat([y, diffs[l]], dim=1))
            if l in self.head_levels:
                out[l] = 2 * torch.sigmoid(self.heads[self.head_levels.index(l)](y))
        return [out[l] for l in self.head_levels]

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, both: bool = True):
        """Gradients of moving -> fixed (and, with `both`, of fixed -> moving), each a list finest first."""
        b = fixed.shape[0]
        feats = self.encode(torch.cat([fixed, moving]))
        diffs = [f[b:] - f[:b] for f in feats]  # E(M) - E(F)
        if not both:
            return self.decode(diffs)
        grads = self.decode([torch.cat([d, -d]) for d in diffs])
        return [g[:b] for g in grads], [g[b:] for g in grads]
