"""Losses and regularizers: known values, physical units on anisotropic and oblique grids."""

import numpy as np
import pytest
import torch

from priorreg import losses, regularizers
from priorreg.filters import gaussian_smooth_mm
from priorreg.spatial import Grid, affine_to_field

from .geometry import oblique


def _grid(spacing=(1.0, 1.0, 1.0), angles=(0, 0, 0), shape=(20, 22, 24)) -> Grid:
    return Grid.of(oblique(angles, spacing, [-10, 5, 20], shape))


def _blob(shape=(20, 22, 24), centre=(10, 11, 12), radius=5.0) -> torch.Tensor:
    k, j, i = np.indices(shape)
    r = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    return torch.as_tensor((r <= radius).astype(np.float32))[None, None]


def test_gaussian_sigma_is_in_mm_on_every_axis():
    grid = _grid(spacing=(0.5, 1.0, 2.0), shape=(31, 41, 61))
    impulse = torch.zeros(1, 1, 31, 41, 61, dtype=torch.float64)
    impulse[0, 0, 15, 20, 30] = 1
    blurred = gaussian_smooth_mm(impulse, grid, 3.0)[0, 0].numpy()
    for axis, spacing in zip((2, 1, 0), (0.5, 1.0, 2.0)):  # array axes i, j, k
        profile = blurred.sum(axis=tuple(a for a in range(3) if a != axis))
        x = (np.arange(profile.size) - profile.size // 2) * spacing
        std_mm = np.sqrt((profile * x**2).sum() / profile.sum())
        assert abs(std_mm - 3.0) < 0.1, (axis, std_mm)


def test_multiscale_dice_values():
    grid = _grid()
    a = _blob()
    assert losses.soft_dice(a, a).item() < 1e-6  # binary labels at sigma 0
    aligned = losses.multiscale_dice(a, a, grid)
    assert all(aligned < losses.multiscale_dice(a, torch.roll(a, s, dims=4), grid) for s in (1, 2, 4))
    far = _blob(centre=(10, 11, 3), radius=2.5)
    near = _blob(centre=(10, 11, 14))
    assert losses.soft_dice(a, far).item() > 0.99  # disjoint at sigma 0
    # smoothing gives disjoint labels a signal: below 1, and lower for the nearer label
    assert losses.multiscale_dice(a, far, grid).item() < 0.999
    assert losses.multiscale_dice(a, near, grid) < losses.multiscale_dice(a, far, grid)


def test_lncc_is_intensity_affine_invariant_and_prefers_alignment():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 1, 12, 12, 12, generator=gen), size=(24, 24, 24), mode="trilinear")
    assert losses.lncc(img, img).item() < -0.97
    # invariant to a*I + b up to the eps that guards flat windows
    assert abs(losses.lncc(img, 3 * img + 2).item() - losses.lncc(img, img).item()) < 0.03
    shifted = torch.roll(img, 3, dims=4)
    assert losses.lncc(img, shifted).item() > losses.lncc(img, img).item() + 0.2


def test_local_gradient_compares_edges_across_contrasts():
    grid = _grid(spacing=(1.0, 1.0, 2.5))
    gen = torch.Generator().manual_seed(1)
    img = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 5, 5, generator=gen), size=(20, 22, 24), mode="trilinear")
    other_contrast = 10 * img**2 + 1  # monotone: same edge directions, different intensities
    same = losses.local_gradient(img, img, grid).item()
    assert same < 0.01  # not 0: 1 - |n|^4 where the gradient is weak (|n| < 1)
    assert losses.local_gradient(img, other_contrast, grid).item() < 0.02
    # Inverted contrast (T1 -> T2: white matter bright -> dark) is as aligned: the sign of an edge does not count.
    assert losses.local_gradient(img, 1 - img, grid).item() == pytest.approx(same, abs=1e-6)
    shifted = torch.roll(img, 4, dims=4)
    assert losses.local_gradient(img, shifted, grid).item() > 0.1


def _t1_t2_phantom(offset_i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested spheres, a head-like T1 and T2 pair: background 0; tissue bright in T1, dark in T2 and a
    core ("CSF") dark in T1, bright in T2, so the inner edge flips sign between the two and the outer one does not."""
    k, j, i = np.indices((24, 24, 24), dtype=np.float64)
    r = np.sqrt((k - 12) ** 2 + (j - 12) ** 2 + (i - 11 - offset_i) ** 2)
    head, core = r <= 9, r <= 4.5
    t1 = np.where(core, 0.2, np.where(head, 1.0, 0.0))
    t2 = np.where(core, 1.0, np.where(head, 0.4, 0.0))
    return tuple(torch.as_tensor(x.astype(np.float32))[None, None] for x in (t1, t2))


def test_local_gradient_is_smallest_at_alignment_of_a_t1_t2_pair():
    """The defect: the signed distance of normalised gradients was largest where T1 and T2 align."""
    grid = _grid(shape=(24, 24, 24))
    t1, t2 = _t1_t2_phantom()
    aligned = losses.local_gradient(t2, t1, grid).item()
    assert aligned < 0.25
    by_shift = {s: losses.local_gradient(t2, _t1_t2_phantom(s)[0], grid).item() for s in (-3, -2, -1, 1, 2, 3)}
    assert all(v > aligned + 0.02 for v in by_shift.values()), (aligned, by_shift)
    # and it grows with the misalignment on either side
    assert by_shift[1] < by_shift[2] < by_shift[3] and by_shift[-1] < by_shift[-2] < by_shift[-3], by_shift


def _smooth_noise(seed: int, size=(24, 24, 24)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, 6, generator=gen, dtype=torch.float64), size=size, mode="trilinear")


def test_mutual_information_ignores_how_intensities_map_and_prefers_alignment():
    img = _smooth_noise(0)
    mi = losses.mutual_information
    aligned = mi(img, img).item()
    assert aligned < -1.5  # minus the entropy of 32 bins' worth of a smooth image
    assert mi(img, 3 * img + 2).item() == pytest.approx(aligned, abs=1e-6)  # each image scaled by its own range
    assert mi(img, 1 - img).item() == pytest.approx(aligned, abs=1e-6)  # inverted contrast, as T1 -> T2
    # A non-monotone map (each value but the middle one reached twice) keeps most of it; LNCC loses it.
    folded = (img - 0.5) ** 2
    shifted = {s: mi(img, torch.roll(img, s, dims=4)).item() for s in (1, 2, 4)}
    assert mi(img, folded).item() < shifted[1] - 0.3, (mi(img, folded).item(), shifted)
    assert losses.lncc(img, folded).item() > losses.lncc(img, torch.roll(img, 1, dims=4)).item()
    assert aligned < shifted[1] < shifted[2] < shifted[4] < 0, shifted
    assert mi(img, _smooth_noise(1)).item() > -0.1  # independent images share next to nothing


def test_mutual_information_gradient_matches_finite_differences():
    """The Parzen windows make the loss smooth in the warped intensities: autograd agrees with central differences
    (away from the two voxels that set the warped image's range, which the scaling holds fixed)."""
    fixed, warped = _smooth_noise(0), torch.roll(_smooth_noise(0), 2, dims=4)
    inner = (warped > warped.min()) & (warped < warped.max())
    direction = torch.randn(warped.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * inner
    x = warped.clone().requires_grad_(True)
    losses.mutual_information(fixed, x).backward()
    h = 1e-5
    numeric = (losses.mutual_information(fixed, warped + h * direction) - losses.mutual_information(fixed, warped - h * direction)) / (2 * h)
    assert (x.grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-4)
    assert abs(numeric.item()) > 1e-4  # a direction that changes the loss


def test_mutual_information_of_a_large_volume_uses_a_fixed_regular_subset():
    img = _smooth_noise(3, size=(40, 40, 40))
    full = losses.mutual_information(img, img.roll(1, 4)).item()
    strided = losses.mutual_information(img, img.roll(1, 4), max_voxels=10_000)
    assert strided.item() == losses.mutual_information(img, img.roll(1, 4), max_voxels=10_000).item()
    assert strided.item() == pytest.approx(full, abs=0.1)


def test_mae_mse():
    a = torch.zeros(1, 1, 3, 3, 3)
    b = torch.full((1, 1, 3, 3, 3), 2.0)
    assert losses.mae(a, b).item() == 2.0 and losses.mse(a, b).item() == 4.0


def test_gradient_l2_of_linear_field_is_frobenius_norm_on_oblique_grid():
    grid = _grid(spacing=(0.8, 1.5, 2.5), angles=(25, -10, 40))
    L = np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.0, 0.15, 0.2]])
    u = affine_to_field(torch.as_tensor(np.c_[np.eye(3) + L, [1.0, 2.0, 3.0]]), grid)  # u(x) = L x + t
    assert abs(regularizers.gradient_l2(u, grid).item() - (L**2).sum()) < 1e-9
    assert regularizers.bending_energy(u, grid).item() < 1e-12


def test_bending_energy_of_quadratic_field_in_mm_units():
    """u_x = a * y^2 (mm) has d2u_x/dy2 = 2a (1/mm): energy 4 a^2, on any grid."""
    a = 0.01
    for spacing, angles in [((1.0, 1.0, 1.0), (0, 0, 0)), ((0.7, 1.9, 3.0), (30, 20, -15))]:
        grid = _grid(spacing=spacing, angles=angles)
        y = grid.points(torch.float64)[..., 1]
        u = torch.stack([a * y**2, torch.zeros_like(y), torch.zeros_like(y)])[None]
        assert abs(regularizers.bending_energy(u, grid).item() - 4 * a**2) < 1e-9
