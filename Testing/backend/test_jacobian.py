"""Jacobian determinant in physical space on anisotropic, oblique, non-zero-origin grids."""

import math

import numpy as np
import pytest
import torch

from priorreg.jacobian import (
    folding_fraction,
    folding_percent,
    jacobian_determinant,
    jacobian_stats,
    jacobian_volume,
    sdlogj,
)
from priorreg.spatial import Grid, affine_to_field, field_volume

from .geometry import oblique


def _grid(spacing=(0.8, 1.3, 2.1), shape=(20, 24, 18), extent=None) -> Grid:
    """Oblique, anisotropic, non-zero-origin grid; `extent` (mm per axis) keeps the field of view fixed."""
    if extent is not None:
        shape = tuple(int(round(e / s)) + 1 for e, s in zip(extent[::-1], spacing[::-1]))
    return Grid.of(oblique([25, -15, 40], spacing, [-12.5, 30.2, 7.0], shape, array=np.zeros(shape)))


def _interior(x: np.ndarray, n: int = 1) -> np.ndarray:
    return x[..., n:-n, n:-n, n:-n]


A = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.15], [-0.1, 0.1, 1.2]])


@pytest.mark.parametrize("center", [None, "grid"])
def test_affine_field_has_det_of_matrix_everywhere(center):
    grid = _grid()
    affine = np.c_[A, [3.0, -2.0, 5.0]]
    field = affine_to_field(torch.as_tensor(affine), grid, center=grid.center if center else None)
    detj = jacobian_determinant(field, grid)
    assert detj.shape == (1, *grid.shape)
    np.testing.assert_allclose(detj.numpy(), np.linalg.det(A), atol=1e-4)
    stats = jacobian_stats(field, grid)
    assert stats["folding_pct"] == 0.0
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    assert stats["detj_mean"] == pytest.approx(np.linalg.det(A), abs=1e-6)
    assert stats["detj_std"] == pytest.approx(0.0, abs=1e-6)


def test_index_space_determinant_would_be_wrong():
    """The chain rule matters: a per-index determinant of the same field is far from det(A)."""
    grid = _grid()
    field = affine_to_field(torch.as_tensor(np.c_[A, np.zeros(3)]), grid)
    index_grads = torch.stack(torch.gradient(field, dim=(4, 3, 2)), dim=2)[0] + torch.eye(3).reshape(3, 3, 1, 1, 1)
    naive = torch.linalg.det(index_grads.permute(2, 3, 4, 0, 1))
    assert float((naive - np.linalg.det(A)).abs().min()) > 0.05
    assert float((jacobian_determinant(field, grid) - np.linalg.det(A)).abs().max()) < 1e-4


# u(x) = (a sin(w y) + a2 sin(w x), b x z / 100, c z^2 / 100) in physical mm
a, a2, w, b, c = 2.0, 3.0, 0.15, 0.5, 0.3


def _nonlinear(grid: Grid) -> tuple[torch.Tensor, np.ndarray]:
    p = grid.points(torch.float64)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    u = torch.stack([a * torch.sin(w * y) + a2 * torch.sin(w * x), b * x * z / 100, c * z**2 / 100])
    x, y, z = x.numpy(), y.numpy(), z.numpy()
    jac = np.zeros((*x.shape, 3, 3))
    jac[..., 0, 0] = 1 + a2 * w * np.cos(w * x)
    jac[..., 0, 1] = a * w * np.cos(w * y)
    jac[..., 1, 0] = b * z / 100
    jac[..., 1, 1] = 1
    jac[..., 1, 2] = b * x / 100
    jac[..., 2, 2] = 1 + 2 * c * z / 100
    return u[None], np.linalg.det(jac)


def test_nonlinear_field_matches_analytic_det_and_converges():
    extent = (17 * 0.8, 23 * 1.3, 19 * 2.1)
    errors = []
    for spacing in [(0.8, 1.3, 2.1), (0.4, 0.65, 1.05)]:
        grid = _grid(spacing, extent=extent)
        field, analytic = _nonlinear(grid)
        assert analytic.min() < 0.7 and analytic.max() > 1.3  # a strongly varying determinant
        detj = jacobian_determinant(field, grid)[0].numpy()
        errors.append(np.abs(_interior(detj - analytic)).max())
    assert errors[0] < 0.005
    # central differences are second order: halving the spacing divides the error by about 4
    assert errors[1] < errors[0] / 3


def test_volume_wrapper_matches_tensor_path():
    grid = _grid()
    field, _ = _nonlinear(grid)
    volume = field_volume(field, grid)
    det_t = jacobian_determinant(field, grid)
    det_v = jacobian_determinant(volume)
    np.testing.assert_allclose(det_v.numpy(), det_t.numpy(), atol=1e-10)
    jv = jacobian_volume(volume)
    assert Grid.of(jv).matches(grid)
    np.testing.assert_allclose(jv.array, det_t[0].numpy(), atol=1e-5)


def test_folding_fraction_of_a_known_folded_slab():
    """u_x = k sin(w' x'): det = 1 + k w' cos(w' x') folds (det <= 0) on a third of each period."""
    grid = _grid((0.7, 0.9, 1.1), shape=(30, 34, 38))
    k, wp = 2.0 / (2 * math.pi / 25.0), 2 * math.pi / 25.0  # k w' = 2: det in [-1, 3]
    n = np.array([0.6, 0.0, 0.8])  # a physical direction, oblique to every index axis
    p = grid.points(torch.float64)
    s = p @ torch.as_tensor(n)
    field = (k * torch.sin(wp * s))[None, None] * torch.as_tensor(n).reshape(1, 3, 1, 1, 1)
    analytic = 1 + k * wp * np.cos(wp * s.numpy())
    detj = jacobian_determinant(field, grid)
    inner = _interior(detj[0].numpy())
    expected = float((_interior(analytic) <= 0).mean())
    assert 0.25 < expected < 0.42  # the known fraction on this finite grid (1/3 on an infinite one)
    assert float(folding_fraction(torch.as_tensor(inner))) == pytest.approx(expected, abs=0.015)
    assert float(folding_percent(torch.as_tensor(inner))) == pytest.approx(100 * expected, abs=1.5)
    stats = jacobian_stats(field, grid)
    assert stats["folding_pct"] == pytest.approx(100 * float((analytic <= 0).mean()), abs=2.0)
    assert stats["detj_mean"] == pytest.approx(float(analytic.mean()), abs=0.05)
    # a mask restricts the statistics: none of the voxels with det > 0.5 folds
    assert jacobian_stats(field, grid, mask=torch.as_tensor(analytic > 0.5))["folding_pct"] == 0.0


def test_sdlogj_values():
    grid = _grid()
    identity = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
    assert float(sdlogj(jacobian_determinant(identity, grid))) == 0.0
    assert jacobian_stats(identity, grid) == {"folding_pct": 0.0, "sdlogj": 0.0, "detj_mean": 1.0, "detj_std": 0.0}
    # std of log det, no shift: log of (1, e, e^2) is (0, 1, 2)
    e = math.e
    assert float(sdlogj(torch.tensor([1.0, e, e * e], dtype=torch.float64))) == pytest.approx(math.sqrt(2 / 3), rel=1e-12)
    # folded voxels are clipped to eps before the log
    eps = 1e-4
    expected = np.std(np.log([eps, 1.0]))
    assert float(sdlogj(torch.tensor([-2.0, 1.0], dtype=torch.float64), eps=eps)) == pytest.approx(expected, rel=1e-12)
    assert float(folding_fraction(torch.tensor([-2.0, 0.0, 1.0, 2.0]))) == 0.5


def test_determinant_is_differentiable():
    grid = _grid()
    field, _ = _nonlinear(grid)
    field = (0.3 * field).requires_grad_(True)
    sdlogj(jacobian_determinant(field, grid)).backward()
    assert field.grad is not None and torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


def test_singleton_axis_and_bad_shape():
    grid = Grid((1, 5, 6), np.array([1.0, 2.0, 3.0]), np.zeros(3), np.eye(3))
    field = affine_to_field(torch.as_tensor(np.c_[np.diag([2.0, 3.0, 1.0]), np.zeros(3)]), grid)
    np.testing.assert_allclose(jacobian_determinant(field, grid).numpy(), 6.0, atol=1e-9)
    with pytest.raises(ValueError):
        jacobian_determinant(torch.zeros(1, 3, 4, 4, 4), grid)
