"""Seed 002's three networks (Deform-GAN, section 2.1): transformation T, generator G, discriminator D.

T and G are "U-Net-like": `nets.unet.UNet3D`'s encoder-decoder (stride-2 levels, trilinear
upsampling to the skip's exact size, so the model frame's size needs no power of two), but
with PyTorch's default initialisation rather than DIP's N(0, 0.01): a *trained* network
needs its activations to carry signal through every level from the first step.

- T: `(fixed, moving)` as two channels -> 3 channels; its output convolution starts at zero,
  so training starts at the identity warp (the method scales the output to mm).
- G: the warped moving image -> the fixed image's modality (intensities in about [0, 1]), with a
  linear output: behind a sigmoid, the L1 term (weight 100) drove G to all-background within
  50 iterations of a real run, its logits near -90, where the sigmoid's gradient vanishes.
- D: a 3D PatchGAN (pix2pix): stride-2 convolutions down to one logit per patch, conditioned
  as pix2pix's conditional GAN (eq. 7, 8): it sees (condition, image) as two channels, the
  condition being G's input (the warped moving image) and the image either the fixed image
  (real) or G's output (fake).
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import UNet3D


def _default_init(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.Conv3d):
            m.reset_parameters()
    return net


def transform_net(channels=(16, 32, 32, 32)) -> UNet3D:
    """T: `[B, 2, K, J, I]` (fixed, moving) -> `[B, 3, K, J, I]`, exactly 0 before training."""
    net = _default_init(UNet3D(2, 3, channels))
    nn.init.zeros_(net.out.weight)
    nn.init.zeros_(net.out.bias)
    return net


def generator_net(channels=(16, 32, 32, 32)) -> UNet3D:
    """G: `[B, 1, K, J, I]` image -> the same in the fixed image's modality."""
    return _default_init(UNet3D(1, 1, channels))


class PatchDiscriminator(nn.Module):
    """D: `(condition, image)` `[B, 1, ...]` each -> patch logits `[B, 1, k, j, i]`.

    One stride-2 4x4x4 convolution per entry of `channels`, instance norm after the first
    (pix2pix's layout), LeakyReLU 0.2, then a 3x3x3 convolution to one logit per patch.
    """

    def __init__(self, channels=(16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 2
        for i, cout in enumerate(channels):
            layers.append(nn.Conv3d(cin, cout, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.InstanceNorm3d(cout, affine=True))
            layers.append(nn.LeakyReLU(0.2))
            cin = cout
        layers.append(nn.Conv3d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([condition, image], dim=1))
