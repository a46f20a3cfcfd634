"""Metrics against SimpleITK's filters and known values, on real shared-data labels and images."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from priorreg import Volume
from priorreg.metrics import dice, hausdorff, hd95, landmark_centroids, landmark_tre, rmse, ssim
from priorreg.spatial import Grid, affine_to_field, field_volume
from priorreg.volume import VolumeError

from .geometry import oblique

SPACING = (0.9, 1.2, 1.7)  # anisotropic, so that every distance depends on the spacing order


def _hippocampus_pair(shared_data):
    """A real label map and the same subject's labels shifted by (2, -1, 1) voxels, with one label eroded,
    on an anisotropic oblique grid with a non-zero origin."""
    path = shared_data / "hippocampus/labels/hippocampus_001.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    labels = Volume.read(path).array.astype(np.uint8)
    moved = np.roll(labels, (1, -1, 2), axis=(0, 1, 2))
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray((moved == 1).astype(np.uint8)), [1, 1, 1]))
    moved[(moved == 1) & (eroded == 0)] = 0
    a = oblique([10, -20, 30], SPACING, [-30, 20, 5], labels.shape, array=labels)
    b = a.with_array(moved)
    return a, b


def _binary_sitk(volume: Volume, label: int) -> sitk.Image:
    return volume.with_array((volume.array == label).astype(np.uint8)).to_sitk()


def test_dice_matches_sitk_label_overlap(shared_data):
    a, b = _hippocampus_pair(shared_data)
    ours = dice(a, b)
    assert sorted(ours) == [1, 2]
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(a.to_sitk(), b.to_sitk())
    for label in (1, 2):
        assert ours[label] == pytest.approx(f.GetDiceCoefficient(label), abs=1e-6)
        assert 0.2 < ours[label] < 0.95  # a real, imperfect overlap
    assert dice(a, a) == {1: 1.0, 2: 1.0}
    # binary and float masks (the MR-US label convention: threshold 0.5)
    assert dice(a.array == 1, b.array == 1)[1] == pytest.approx(ours[1], abs=1e-12)
    soft = np.where(b.array == 1, 0.7, 0.2)
    assert dice((a.array == 1).astype(np.float64), soft)[1] == pytest.approx(ours[1], abs=1e-12)
    assert np.isnan(dice(a, b, labels=[7])[7])


def test_hausdorff_matches_sitk(shared_data):
    a, b = _hippocampus_pair(shared_data)
    for label in (1, 2):
        f = sitk.HausdorffDistanceImageFilter()
        f.Execute(_binary_sitk(a, label), _binary_sitk(b, label))
        reference = f.GetHausdorffDistance()
        # SimpleITK's definition: over all foreground voxels
        all_voxels = hausdorff(a, b, percentile=100, surface=False, label=label)
        assert all_voxels == pytest.approx(reference, abs=1e-5)
        # surfaces: the same maximum within a voxel
        hd100 = hausdorff(a, b, percentile=100, label=label)
        assert hd100 == pytest.approx(reference, abs=max(SPACING))
        h95 = hd95(a, b, label=label)
        assert 0 < h95 <= hd100
    # the spacing is used: the same arrays at 1 mm give a different (smaller) distance
    iso = hausdorff(a.array == 1, b.array == 1, spacing=(1.0, 1.0, 1.0), percentile=100, surface=False)
    assert iso != pytest.approx(hausdorff(a, b, percentile=100, surface=False, label=1), abs=1e-3)


@pytest.mark.parametrize("axis,spacing_index", [(2, 0), (0, 2)])  # array axis i <-> spacing x, k <-> z
def test_hausdorff_of_shifted_box_is_the_shift_in_mm(axis, spacing_index):
    a = np.zeros((30, 32, 34), dtype=np.uint8)
    a[8:20, 9:21, 10:22] = 1
    b = np.roll(a, 3, axis=axis)
    volume = oblique([0, 30, 0], SPACING, [5, 6, 7], a.shape, array=a)
    shift_mm = 3 * SPACING[spacing_index]
    assert hausdorff(volume, volume.with_array(b), percentile=100) == pytest.approx(shift_mm, abs=1e-9)
    assert hausdorff(volume, volume.with_array(b), percentile=100, surface=False) == pytest.approx(shift_mm, abs=1e-9)
    assert 0 < hd95(volume, volume.with_array(b)) <= shift_mm
    assert hd95(volume, volume) == 0.0
    assert np.isnan(hd95(volume, volume.with_array(np.zeros_like(a))))


def test_geometry_mismatch_is_refused():
    a = oblique([0, 0, 0], SPACING, [0, 0, 0], (5, 6, 7))
    b = oblique([0, 0, 0], (1.0, 1.0, 1.0), [0, 0, 0], (5, 6, 7))
    with pytest.raises(VolumeError, match="different grids"):
        dice(a, b)
    with pytest.raises(VolumeError):
        rmse(a.array, np.zeros((5, 6, 8)))


# ------------------------------------------------------------------- TRE
def _mrus(shared_data, obs="obs000"):
    root = shared_data / "mrus_prostate"
    fixed, moving = root / f"fixed_labels/{obs}.nii.gz", root / f"moving_labels/{obs}.nii.gz"
    if not fixed.exists() or not moving.exists():
        pytest.skip(f"MR-US labels for {obs} not found under {root}")
    return fixed, moving


def _sitk_centroids(path) -> np.ndarray:
    """Physical centroids of landmark channels 1.. by SimpleITK, straight from the 4D file."""
    image = sitk.ReadImage(str(path))
    size = image.GetSize()
    out = []
    for c in range(1, size[3]):
        channel = sitk.Extract(image, (*size[:3], 0), (0, 0, 0, c))
        binary = sitk.BinaryThreshold(channel, 0.5, 1e9, 1, 0)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(binary)
        out.append(stats.GetCentroid(1))
    return np.array(out)


def test_identity_tre_matches_sitk_centroids(shared_data):
    fixed_path, moving_path = _mrus(shared_data)
    fixed, moving = Volume.read(fixed_path), Volume.read(moving_path)
    cf, cm = _sitk_centroids(fixed_path), _sitk_centroids(moving_path)
    np.testing.assert_allclose(landmark_centroids(fixed), cf, atol=1e-6)
    np.testing.assert_allclose(landmark_centroids(moving), cm, atol=1e-6)
    expected = np.linalg.norm(cf - cm, axis=1)
    result = landmark_tre(None, fixed, moving)
    assert result["per_landmark"].shape == (fixed.array.shape[0] - 1,)
    np.testing.assert_allclose(result["per_landmark"], expected, atol=1e-6)
    assert result["rms"] == pytest.approx(np.sqrt(np.mean(expected**2)), abs=1e-6)
    zero = torch.zeros(1, 3, *fixed.shape, dtype=torch.float64)
    np.testing.assert_allclose(landmark_tre(zero, fixed, moving)["per_landmark"], expected, atol=1e-9)
    # the moving centroids live in the moving image's own physical space
    shifted = Volume(moving.array, moving.spacing, moving.origin + [10.0, 0.0, 0.0], moving.direction)
    np.testing.assert_allclose(landmark_tre(None, fixed, shifted)["moving_centroids"], cm + [10.0, 0.0, 0.0], atol=1e-6)


def test_translation_field_shifts_mapped_landmarks_by_t(shared_data):
    fixed_path, moving_path = _mrus(shared_data)
    fixed, moving = Volume.read(fixed_path), Volume.read(moving_path)
    grid = Grid.of(fixed)
    t = np.array([4.0, -7.5, 2.25])
    field = affine_to_field(torch.as_tensor(np.c_[np.eye(3), t]), grid)
    cf, cm = _sitk_centroids(fixed_path), _sitk_centroids(moving_path)
    result = landmark_tre(field, fixed, moving)
    np.testing.assert_allclose(result["mapped"], cf + t, atol=1e-6)
    np.testing.assert_allclose(result["per_landmark"], np.linalg.norm(cf + t - cm, axis=1), atol=1e-6)
    # the same as a field Volume, and a non-translation affine is sampled exactly (linear interpolation)
    np.testing.assert_allclose(landmark_tre(field_volume(field, grid), fixed, moving)["mapped"], cf + t, atol=1e-6)
    A = np.array([[1.05, 0.1, 0.0], [-0.05, 0.95, 0.08], [0.02, 0.0, 1.1]])
    affine = affine_to_field(torch.as_tensor(np.c_[A, t]), grid, center=grid.center)
    mapped = landmark_tre(affine, fixed, moving)["mapped"]
    np.testing.assert_allclose(mapped, (cf - grid.center) @ A.T + grid.center + t, atol=1e-6)


def test_tre_refuses_mismatched_channels(shared_data):
    fixed_path, moving_path = _mrus(shared_data)
    fixed, moving = Volume.read(fixed_path), Volume.read(moving_path)
    with pytest.raises(VolumeError, match="channels"):
        landmark_tre(None, fixed, Volume(moving.array[:-1], moving.spacing, moving.origin, moving.direction))


# --------------------------------------------------------- SSIM and RMSE
def _real_image(shared_data) -> Volume:
    path = shared_data / "mrus_prostate/fixed_images/obs000.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return Volume.read(path)


def test_ssim_properties_on_a_real_image(shared_data):
    image = _real_image(shared_data)
    a = image.array.astype(np.float64)
    rng = np.random.default_rng(0)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    scores = [ssim(a, a + rng.normal(0, sigma, a.shape), data_range=255.0) for sigma in (2.0, 8.0, 32.0)]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0
    b = a + rng.normal(0, 8.0, a.shape)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    mask = a > np.median(a)
    assert ssim(a, b, mask=mask) != pytest.approx(ssim(a, b), abs=1e-4)


def test_ssim_known_values():
    # constant images: the luminance term alone, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    m1, m2, L = 0.3, 0.5, 1.0
    c1 = (0.01 * L) ** 2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert ssim(np.full((13, 14, 15), m1), np.full((13, 14, 15), m2), data_range=L) == pytest.approx(expected, rel=1e-12)
    # same local means, inverted texture: luminance 1, structure -1, so SSIM near -1
    x = np.random.default_rng(1).normal(0, 1, (16, 16, 16))
    assert ssim(5 + x, 5 - x, data_range=10.0) < -0.9


def test_rmse_known_values():
    a = np.zeros((4, 5, 6))
    b = np.full((4, 5, 6), 3.0)
    assert rmse(a, b) == 3.0
    b[:2] = 4.0
    assert rmse(a, b) == pytest.approx(np.sqrt((16 + 9) / 2), rel=1e-12)
    mask = np.zeros(a.shape, bool)
    mask[:2] = True
    assert rmse(a, b, mask=mask) == 4.0
    assert rmse(a, a) == 0.0
