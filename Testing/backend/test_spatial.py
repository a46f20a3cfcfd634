"""Spatial transforms agree with SimpleITK on anisotropic, oblique, non-zero-origin grids."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.linalg import expm

from priorreg import Volume
from priorreg.spatial import (
    Grid,
    affine_to_field,
    compose,
    field_to_sitk,
    field_volume,
    integrate_svf,
    read_field,
    resample,
    sample,
    warp,
    write_field,
)

from .geometry import fixed_volume, moving_volume, oblique, smooth_field


def _points_inside(grid: Grid, n: int, seed: int = 0) -> torch.Tensor:
    """Random physical points (not voxel centres) inside the grid."""
    rng = np.random.default_rng(seed)
    index = rng.random((n, 3)) * (np.array(grid.shape[::-1]) - 1)
    return torch.as_tensor(np.c_[index, np.ones(n)] @ grid.index_to_physical.T)[:, :3]


@pytest.mark.parametrize("mode,interpolator", [("linear", sitk.sitkLinear), ("nearest", sitk.sitkNearestNeighbor)])
def test_warp_matches_sitk_resample_with_exported_field(tmp_path, mode, interpolator):
    moving, fixed = moving_volume(), fixed_volume()
    grid = Grid.of(fixed)
    field = field_volume(smooth_field(grid, 3.0), grid)
    ours = resample(moving, fixed, field, mode=mode)
    write_field(field, tmp_path / "field.nii.gz")  # through the file users exchange
    transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(tmp_path / "field.nii.gz")), sitk.sitkVectorFloat64))
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(moving.to_sitk(), fixed.to_sitk(), transform, interpolator, 0.0, sitk.sitkFloat32)
    )
    assert np.abs(ours.array).max() > 0.1 and (theirs != 0).mean() > 0.3  # overlapping FOVs, not a trivial pass
    assert np.abs(theirs - ours.array).max() < 1e-3


def test_field_points_match_sitk_transform_point():
    grid = Grid.of(fixed_volume())
    u = smooth_field(grid, 4.0, seed=1)
    transform = sitk.DisplacementFieldTransform(field_to_sitk(field_volume(u, grid)))
    pts = _points_inside(grid, 300)
    ours = pts + sample(u, grid, pts[None], padding="border")[0].T
    theirs = np.array([transform.TransformPoint(p.tolist()) for p in pts.numpy()])
    assert np.abs(ours.numpy() - theirs).max() < 0.05
    assert np.linalg.norm(theirs - pts.numpy(), axis=1).mean() > 0.5  # the field really moves points


def test_read_field_round_trip(tmp_path):
    grid = Grid.of(fixed_volume())
    field = field_volume(smooth_field(grid), grid)
    write_field(field, tmp_path / "u.nrrd")
    back = read_field(tmp_path / "u.nrrd")
    np.testing.assert_allclose(back.array, field.array, atol=1e-12)
    assert Grid.of(back).matches(grid)


def test_affine_to_field_matches_sitk_affine_with_centre():
    grid = Grid.of(fixed_volume())
    rng = np.random.default_rng(4)
    a = expm(np.array([[0, -0.2, 0.1], [0.2, 0, -0.3], [-0.1, 0.3, 0]])) @ np.diag([1.1, 0.9, 1.05])
    t = rng.normal(size=3) * 5
    c = grid.center
    u = affine_to_field(torch.as_tensor(np.c_[a, t]).reshape(12), grid, center=c)
    ref = sitk.AffineTransform(a.ravel().tolist(), t.tolist(), c.tolist())
    pts = grid.points(torch.float64).reshape(-1, 3)
    ours = (pts + u[0].reshape(3, -1).T).numpy()
    theirs = np.array([ref.TransformPoint(p) for p in pts.numpy()[::37].tolist()])
    assert np.abs(ours[::37] - theirs).max() < 1e-6


def test_compose_of_affines_is_their_product():
    grid = Grid.of(fixed_volume())
    a1 = np.eye(4)
    a1[:3, :3] = expm(np.array([[0, -0.1, 0], [0.1, 0, 0], [0, 0, 0]]))
    a1[:3, 3] = [2, -1, 3]
    a2 = np.eye(4)
    a2[:3, :3] = np.diag([1.1, 0.95, 1.0])
    a2[:3, 3] = [-1, 0.5, 2]
    first = affine_to_field(torch.as_tensor(a1), grid)
    then = affine_to_field(torch.as_tensor(a2), grid)
    expected = affine_to_field(torch.as_tensor(a2 @ a1), grid)  # x -> a2(a1(x))
    got = compose(first, then, grid)
    # border padding extrapolates 'then' where a1 leaves the grid: compare where it stays inside
    moved = grid.points(torch.float64) + first[0].movedim(0, -1)
    index = (moved.reshape(-1, 3).numpy() - grid.origin) @ np.linalg.inv(grid.index_to_physical[:3, :3]).T
    inside = np.all((index >= 0) & (index <= np.array(grid.shape[::-1]) - 1), axis=1)
    assert inside.mean() > 0.5
    err = (got - expected)[0].reshape(3, -1).T.numpy()[inside]
    assert np.abs(err).max() < 1e-6


def test_warp_by_composition_equals_two_warps():
    fixed = fixed_volume()
    grid = Grid.of(fixed)
    img = torch.as_tensor(moving_volume().array)[None, None].double()
    first, then = smooth_field(grid, 1.0, seed=5), smooth_field(grid, 1.0, seed=6)
    m = Grid.of(moving_volume())
    once = warp(img, compose(first, then, grid), grid, m)
    twice = warp(warp(img, then, grid, m), first, grid)  # moving -> fixed grid, then again
    # compare where the intermediate image was inside the moving FOV for every interpolation
    # neighbour, away from the fixed grid's edge (where the intermediate image is edge-clamped)
    ones = torch.ones_like(img)
    inside = warp(warp(ones, then, grid, m), first, grid) > 0.999
    inside[..., :2, :, :] = inside[..., -2:, :, :] = False
    inside[..., :2, :] = inside[..., -2:, :] = inside[..., :2] = inside[..., -2:] = False
    assert inside.float().mean() > 0.3
    assert (once - twice)[inside].abs().max() < 0.1  # differs only by interpolating the intermediate image


def test_svf_of_constant_velocity_is_that_translation():
    grid = Grid.of(fixed_volume())
    v = torch.tensor([2.0, -3.0, 1.5], dtype=torch.float64).reshape(1, 3, 1, 1, 1).expand(1, 3, *grid.shape)
    u = integrate_svf(v.contiguous(), grid)
    assert torch.allclose(u, v, atol=1e-9)


def test_svf_of_linear_velocity_is_matrix_exponential():
    vol = oblique([0, 0, 30], [1.0, 1.5, 2.0], [-20, -30, -25], (25, 25, 25))
    grid = Grid.of(vol)
    L = np.array([[0.0, -0.2, 0.05], [0.2, 0.0, 0.0], [-0.05, 0.0, 0.08]])
    c = grid.center
    v = affine_to_field(torch.as_tensor(np.c_[np.eye(3) + L, np.zeros(3)]), grid, center=c)  # v(x) = L (x - c)
    u = integrate_svf(v, grid, steps=8)
    expected = affine_to_field(torch.as_tensor(np.c_[expm(L), np.zeros(3)]), grid, center=c)
    core = (slice(None), slice(None), slice(7, -7), slice(7, -7), slice(7, -7))
    assert (u - expected)[core].abs().max() < 0.05
    assert expected[core].abs().max() > 1.0


def test_resample_onto_another_grid_matches_sitk(shared_data):
    """MR and ultrasound never share a grid: resample the real MR onto the real TRUS grid."""
    mr = Volume.read(shared_data / "mrus_prostate" / "moving_images" / "obs000.nii.gz")
    us = Volume.read(shared_data / "mrus_prostate" / "fixed_images" / "obs000.nii.gz")
    ours = resample(mr, us, mode="linear")
    assert ours.array.dtype == np.float32 and ours.shape == us.shape and Grid.of(ours).matches(us)
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(sitk.Cast(mr.to_sitk(), sitk.sitkFloat32), us.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0)
    )
    assert np.abs(ours.array - theirs).max() < 1e-3
    labels = resample(Volume.read(shared_data / "hippocampus" / "labels" / "hippocampus_001.nii.gz"),
                      Volume.read(shared_data / "hippocampus" / "images" / "hippocampus_003.nii.gz"))
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) <= {0, 1, 2}


def test_grid_scaled_keeps_the_field_of_view():
    grid = Grid.of(fixed_volume())
    coarse = grid.scaled(4)
    assert all(c < f for c, f in zip(coarse.shape, grid.shape))
    last = np.array(grid.shape[::-1]) - 1
    last_c = np.array(coarse.shape[::-1]) - 1
    np.testing.assert_allclose(coarse.index_to_physical[:3] @ np.append(last_c, 1), grid.index_to_physical[:3] @ np.append(last, 1))
    np.testing.assert_allclose(coarse.center, grid.center)
