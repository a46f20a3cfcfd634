"""Smoothness penalties of displacement fields, in physical units.

MONAI's `BendingEnergyLoss` and `DiffusionLoss` differentiate in voxel units
on an implicit isotropic grid; on a 0.4 x 0.4 x 6.5 mm MR or an oblique
ultrasound volume that weighs axes wrongly. These differentiate `u` (mm) with
respect to physical position (mm) through `filters.physical_gradient`, so a
weight means the same on every grid: L2 gradient norm is dimensionless, bending
energy is in 1/mm^2.
"""

from __future__ import annotations

import torch

from .filters import physical_gradient
from .spatial import Grid


def gradient_l2(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over voxels of the squared Frobenius norm of du/dx (dimensionless)."""
    g = physical_gradient(field, grid)  # [B, 3, 3, ...]
    return (g * g).sum((1, 2)).mean()


def bending_energy(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean over voxels of the sum of squared second derivatives d2u/dx_a dx_b (1/mm^2)."""
    g = physical_gradient(field, grid).flatten(1, 2)  # [B, 9, ...]: du_c/dx_a
    h = physical_gradient(g, grid)  # [B, 9, 3, ...]: d2u_c/dx_a dx_b
    return (h * h).sum((1, 2)).mean()
