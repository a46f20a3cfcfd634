"""Seed 000's registration network and discriminator (Hu et al. 2018, section 2.4, Fig. 2).

Registration network: a 3D encoder-decoder on the concatenated (fixed, moving) pair.
- Encoder: at each of the levels s0..s3 a residual block, then a stride-2 convolution
  down to the next level (channels double); s4 is the deepest level.
- Decoder: at each level, a stride-2 transposed convolution of the coarser level plus
  a trilinear *additive* up-sampling of it (resize, then sum groups of channels down to
  the finer width, NiftyNet's parameter-free up-sampling), plus the encoder's skip
  (summation), then a "reverse" residual block.
- Five displacement summands, one 3x3x3 convolution per level s0..s4, trilinearly
  up-sampled to s0 and summed: the local field.
- An affine branch from s4 (one residual block, then a fully connected layer) giving
  12 parameters, zero-initialised so training starts from the identity.

Normalisation is GroupNorm, not the paper's batch normalisation: CPU batches are tiny,
and a batch-independent layer makes data-parallel training (torchrun) compute exactly
what one process computes on the same global batch.

The discriminator is the same encoder applied to a 3-channel displacement field, no
normalisation on its first layer, leaky ReLU throughout, and one fully connected logit.
`depth` is the number of halvings (4 in the paper: levels s0..s4); input sizes must be
divisible by 2**depth. The CPU-sized models use 3 halvings on a 3 mm grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 2) or 1, channels)


class ResBlock(nn.Module):
    """conv-norm-act-conv-norm plus the input, then act: the paper's resnet block."""

    def __init__(self, channels: int, act: type[nn.Module], norm: bool = True):
        super().__init__()
        make_norm = _norm if norm else (lambda c: nn.Identity())
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1),
            make_norm(channels),
            act(),
            nn.Conv3d(channels, channels, 3, padding=1),
            make_norm(channels),
        )
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _conv(cin: int, cout: int, act: type[nn.Module], stride: int = 1, norm: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), _norm(cout) if norm else nn.Identity(), act())


class _LeakyReLU(nn.LeakyReLU):
    def __init__(self):
        super().__init__(0.2)


def _check_shape(shape, depth: int) -> list[int]:
    """The deepest level's size, after checking that `depth` halvings divide `shape` exactly."""
    if any(s % 2**depth for s in shape):
        raise ValueError(f"model grid shape {tuple(shape)} must be divisible by {2**depth} on every axis (depth {depth})")
    return [s // 2**depth for s in shape]


class Encoder(nn.Module):
    """Levels s0..s_depth with widths n0, 2n0, 4n0, ...; returns every level's features."""

    def __init__(self, in_channels: int, n0: int, act: type[nn.Module], depth: int = 4, first_norm: bool = True):
        super().__init__()
        widths = [n0 * 2**i for i in range(depth + 1)]
        self.widths = widths
        self.inc = _conv(in_channels, widths[0], act, norm=first_norm)
        self.blocks = nn.ModuleList(ResBlock(w, act) for w in widths[:-1])
        self.down = nn.ModuleList(_conv(a, b, act, stride=2) for a, b in zip(widths[:-1], widths[1:]))
        self.deepest = ResBlock(widths[-1], act)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        h = self.inc(x)
        for block, down in zip(self.blocks, self.down):
            h = block(h)
            levels.append(h)
            h = down(h)
        levels.append(self.deepest(h))
        return levels


def additive_upsample(x: torch.Tensor, size, channels: int) -> torch.Tensor:
    """Trilinear resize, then sum consecutive channel groups down to `channels` (no parameters)."""
    up = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return up.reshape(up.shape[0], channels, -1, *up.shape[2:]).sum(dim=2)


class RegistrationNet(nn.Module):
    """`[B, 2, K, J, I]` (fixed, moving) -> local field `[B, 3, K, J, I]` and affine `[B, 3, 4]`.

    Both outputs are in the units the caller trains them in (mm in PriorReg's model frame).
    The affine is returned as the *displacement* matrix: `u_global(x) = A[:, :3] x + A[:, 3]`,
    zero at initialisation.
    """

    def __init__(self, shape, n0: int = 8, depth: int = 4):
        super().__init__()
        deep = _check_shape(shape, depth)
        act = nn.ReLU
        self.encoder = Encoder(2, n0, act, depth)
        w = self.encoder.widths
        self.deconv = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2), _norm(w[i]), act()) for i in range(depth)
        )
        self.decode = nn.ModuleList(ResBlock(w[i], act) for i in range(depth))
        self.summands = nn.ModuleList(nn.Conv3d(w[i], 3, 3, padding=1) for i in range(depth + 1))
        for conv in self.summands:
            nn.init.normal_(conv.weight, 0.0, 1e-3)
            nn.init.zeros_(conv.bias)
        self.affine_block = ResBlock(w[-1], act)
        self.affine_fc = nn.Linear(w[-1] * deep[0] * deep[1] * deep[2], 12)
        nn.init.zeros_(self.affine_fc.weight)
        nn.init.zeros_(self.affine_fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.encoder(x)
        size = x.shape[2:]
        h = levels[-1]
        local = F.interpolate(self.summands[-1](h), size=size, mode="trilinear", align_corners=False)
        for i in reversed(range(len(self.decode))):
            skip = levels[i]
            h = self.deconv[i](h) + additive_upsample(h, skip.shape[2:], skip.shape[1]) + skip
            h = self.decode[i](h)
            d = self.summands[i](h)
            local = local + (d if i == 0 else F.interpolate(d, size=size, mode="trilinear", align_corners=False))
        affine = self.affine_fc(self.affine_block(levels[-1]).flatten(1)).reshape(-1, 3, 4)
        return local, affine


class Discriminator(nn.Module):
    """`[B, 3, K, J, I]` normalised local field -> `[B]` logits (simulated = 1)."""

    def __init__(self, shape, n0: int = 8, depth: int = 4):
        super().__init__()
        deep = _check_shape(shape, depth)
        self.encoder = Encoder(3, n0, _LeakyReLU, depth, first_norm=False)
        self.fc = nn.Linear(self.encoder.widths[-1] * deep[0] * deep[1] * deep[2], 1)

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(field)[-1].flatten(1)).squeeze(1)
