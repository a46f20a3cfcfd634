"""Jacobian determinant of a deformation and the statistics reported for it.

The determinant is of `phi(x) = x + u(x)` in *physical* space (ARCHITECTURE.md):
`det(I + du/dx)` with `u` in mm and derivatives per mm, from
`filters.physical_gradient`: index-axis differences carried to physical axes by
the chain rule `du/dx = du/d(index) @ d(index)/dx`, with `d(index)/dx` the
inverse of `direction * spacing` from `Grid.index_to_physical`. That makes the result
correct on anisotropic and oblique grids, where a per-voxel determinant would
be off by the spacing ratios or mix axes.

Everything is torch and differentiable (except the folding count, a step
function), so the same code serves as a loss term and as an evaluation metric.

Reported statistics (names as in the evaluation summary):
- `folding_pct`: percentage of voxels with `det <= 0`.
- `sdlogj`: standard deviation of `log(clip(det, eps, big))`. Clipping keeps
  folded voxels in the statistic (as very negative logs) without producing
  NaN; the determinant is never shifted by a constant (some benchmarks add 3
  before the log, which changes the statistic for every field).
- `detj_mean`, `detj_std`: mean and standard deviation of the determinant.
"""

from __future__ import annotations

import numpy as np
import torch

from .filters import physical_gradient
from .spatial import Grid, field_tensor
from .volume import Volume, VolumeError

SDLOGJ_EPS = 1e-9
SDLOGJ_BIG = 1e9


def _field_and_grid(field, grid: Grid | None) -> tuple[torch.Tensor, Grid]:
    """Accept a tensor `[B, 3, K, J, I]` / `[3, K, J, I]` with a Grid, or a field Volume."""
    if isinstance(field, Volume):
        g = Grid.of(field)
        if grid is not None and not Grid.of(grid).matches(g):
            raise VolumeError(f"{field.source or 'field'}: the field's geometry differs from the grid given")
        return field_tensor(field, torch.float64), g
    if grid is None:
        raise ValueError("a field tensor needs its Grid (or pass the field as a Volume)")
    grid = Grid.of(grid)
    field = torch.as_tensor(field)
    if field.dim() == 4:
        field = field.unsqueeze(0)
    if field.dim() != 5 or field.shape[1] != 3 or tuple(field.shape[2:]) != tuple(grid.shape):
        raise VolumeError(f"field of shape {tuple(field.shape)} does not fit grid {tuple(grid.shape)} (expected [B, 3, K, J, I])")
    if not field.is_floating_point():
        field = field.double()
    return field, grid


def jacobian_matrix(field, grid: Grid | None = None) -> torch.Tensor:
    """Jacobian of `phi` in physical space, `[B, 3, 3, K, J, I]`: entry `[a, b]` is `d phi_a / d x_b`."""
    field, grid = _field_and_grid(field, grid)
    du_dx = physical_gradient(field, grid)  # [B, a, b, ...] = d u_a / d x_b
    eye = torch.eye(3, dtype=field.dtype, device=field.device).reshape(1, 3, 3, 1, 1, 1)
    return du_dx + eye


def jacobian_determinant(field, grid: Grid | None = None) -> torch.Tensor:
    """`det(I + du/dx)` of `phi` with derivatives in mm: `[B, K, J, I]`.

    `field` is a tensor `[B, 3, K, J, I]` (mm, on `grid`) or a field Volume (then `grid` may be omitted).
    """
    j = jacobian_matrix(field, grid)
    a, b, c = j[:, 0, 0], j[:, 0, 1], j[:, 0, 2]
    d, e, f = j[:, 1, 0], j[:, 1, 1], j[:, 1, 2]
    g, h, i = j[:, 2, 0], j[:, 2, 1], j[:, 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_volume(field: Volume) -> Volume:
    """The determinant of a field Volume `[3, K, J, I]` as a scalar Volume on the same grid (float32)."""
    det = jacobian_determinant(field)[0].detach().cpu().numpy().astype(np.float32)
    return Volume(det, field.spacing, field.origin, field.direction)


def _select(detj: torch.Tensor, mask) -> torch.Tensor:
    """Flattened determinants, restricted to `mask` (broadcast to `detj`'s shape) when given."""
    detj = torch.as_tensor(detj)
    if mask is None:
        return detj.reshape(-1)
    if isinstance(mask, Volume):
        mask = mask.array
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask, device=detj.device)
    mask = torch.broadcast_to(mask.bool(), detj.shape)
    return detj[mask]


def folding_fraction(detj: torch.Tensor, mask=None) -> torch.Tensor:
    """Fraction (0..1) of voxels with `det <= 0` (inside `mask` when given). Not differentiable."""
    d = _select(detj, mask)
    if d.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (d <= 0).double().mean()


def folding_percent(detj: torch.Tensor, mask=None) -> torch.Tensor:
    """Percentage (0..100) of voxels with `det <= 0`: the summary's `folding_pct`."""
    return 100.0 * folding_fraction(detj, mask)


def sdlogj(detj: torch.Tensor, eps: float = SDLOGJ_EPS, mask=None, big: float = SDLOGJ_BIG) -> torch.Tensor:
    """Standard deviation of `log(clip(det, eps, big))` (population std). Differentiable.

    Folded voxels (det <= 0) count as `log(eps)`; the determinant is never shifted.
    """
    d = _select(detj, mask)
    if d.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return torch.log(d.clamp(eps, big)).std(unbiased=False)


def jacobian_stats(field, grid: Grid | None = None, mask=None, eps: float = SDLOGJ_EPS) -> dict:
    """`folding_pct`, `sdlogj`, `detj_mean`, `detj_std` (floats) of a field, over `mask` when given.

    `mask` (array, tensor or Volume, `[K, J, I]`) restricts the statistics, e.g. to the fixed
    image's foreground; with a batch of fields the statistics pool all of them.
    """
    detj = jacobian_determinant(field, grid).detach()
    d = _select(detj, mask).double()
    return {
        "folding_pct": float(folding_percent(d)),
        "sdlogj": float(sdlogj(d, eps)),
        "detj_mean": float(d.mean()) if d.numel() else float("nan"),
        "detj_std": float(d.std(unbiased=False)) if d.numel() else float("nan"),
    }
