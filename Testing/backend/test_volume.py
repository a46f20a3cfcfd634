"""Volume IO: formats, dtypes, geometry kept; bad input gives a clear error and writes nothing."""

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from priorreg import Volume, VolumeError

from .geometry import oblique


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_round_trip_keeps_dtype_and_oblique_geometry(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((7, 9, 11)) * 100).astype(dtype)
    vol = oblique([20, -35, 50], [0.7, 1.3, 3.1], [-12.5, 40.25, 7.0], (7, 9, 11), array)
    back = Volume.read(vol.write(tmp_path / f"v{suffix}"))
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)


def test_4d_label_file_reads_as_channels(shared_data):
    labels = Volume.read(shared_data / "mrus_prostate" / "fixed_labels" / "obs000.nii.gz")
    image = Volume.read(shared_data / "mrus_prostate" / "fixed_images" / "obs000.nii.gz")
    assert labels.array.ndim == 4 and 2 <= labels.channels <= 6
    assert labels.shape == image.shape
    np.testing.assert_allclose(labels.spacing, image.spacing, atol=1e-5)
    np.testing.assert_allclose(labels.origin, image.origin, atol=1e-4)
    assert (labels.array[0] > 0.5).sum() > 1000  # the gland is a real region
    assert image.array.dtype == np.uint8


def test_4d_channels_round_trip(tmp_path, shared_data):
    labels = Volume.read(shared_data / "mrus_prostate" / "moving_labels" / "obs000.nii.gz")
    back = Volume.read(labels.write(tmp_path / "labels.nii.gz"))
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_allclose(back.direction, labels.direction, atol=1e-6)


def _write_sitk(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match=r"nope\.nii\.gz: file not found"):
        Volume.read(tmp_path / "nope.nii.gz")


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a nifti header" * 10))
    with pytest.raises(VolumeError, match=r"broken\.nii\.gz: cannot be read as an image"):
        Volume.read(bad)


def test_2d_image(tmp_path):
    path = _write_sitk(sitk.Image(10, 12, sitk.sitkUInt8), tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeError, match=r"slice\.nii\.gz: 2D image"):
        Volume.read(path)


def test_vector_data_that_is_not_3d(tmp_path):
    two = _write_sitk(sitk.Image([5, 6, 7], sitk.sitkVectorFloat32, 2), tmp_path / "field2.nii.gz")
    with pytest.raises(VolumeError, match=r"field2\.nii\.gz: vector image with 2 components"):
        Volume.read(two)
    flat = _write_sitk(sitk.Image([5, 6], sitk.sitkVectorFloat32, 2), tmp_path / "field2d.nii.gz")
    with pytest.raises(VolumeError, match=r"field2d\.nii\.gz: 2D image"):
        Volume.read(flat)


def test_nan_voxels_named(tmp_path):
    image = sitk.GetImageFromArray(np.where(np.arange(60).reshape(3, 4, 5) == 7, np.nan, 1.0))
    path = _write_sitk(image, tmp_path / "nan.nrrd")
    with pytest.raises(VolumeError, match=r"nan\.nrrd: 1 voxels are NaN or infinite"):
        Volume.read(path)
    with pytest.raises(VolumeError, match="NaN or infinite"):
        Volume(np.full((3, 3, 3), np.inf))


def test_zero_size_axis_and_singular_direction():
    with pytest.raises(VolumeError, match="zero-size axis"):
        Volume(np.zeros((0, 4, 4)))
    singular = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1.0]])
    with pytest.raises(VolumeError, match="singular direction"):
        Volume(np.zeros((3, 4, 4)), direction=singular)


def test_bad_volume_never_changes_an_existing_file(tmp_path):
    path = Volume(np.ones((3, 4, 5), np.float32)).write(tmp_path / "keep.nii.gz")
    before = path.read_bytes()
    vol = Volume(np.ones((3, 4, 5), np.float32))
    vol.array[1, 1, 1] = np.nan  # corrupted after construction
    with pytest.raises(VolumeError, match="NaN"):
        vol.write(path)
    with pytest.raises(VolumeError, match="unsupported extension"):
        Volume(np.ones((3, 4, 5))).write(tmp_path / "keep.png")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]  # no temporary left behind
