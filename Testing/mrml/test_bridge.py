"""MRML bridge on a real `vtkMRMLScene` (slicer-core wheel): geometry, labels and transforms round trips.

Geometry is anisotropic, oblique and off-origin throughout, so that a lost
spacing, a transposed direction or a missed LPS/RAS flip fails a test.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402  (slicer-core brings vtk)
from slicer.util import arrayFromVTKMatrix, vtkMatrixFromArray  # noqa: E402

from priorreg import Volume  # noqa: E402
from priorreg.slicer import (  # noqa: E402
    FIXED_VOLUME_ROLE,
    MOVING_VOLUME_ROLE,
    field_from_transform_node,
    labels_from_segmentation,
    node_from_volume,
    segmentation_from_labels,
    transform_node_from_field,
    volume_from_node,
)
from priorreg.spatial import Grid, affine_to_field, field_tensor, field_volume, sample  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
SPACING = np.array([0.8, 1.3, 2.1])
ORIGIN = np.array([12.5, -30.25, 7.75])


def rotation(ax, ay, az) -> np.ndarray:
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTION = rotation(20, -15, 30)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def oblique(array) -> Volume:
    return Volume(array, SPACING, ORIGIN, DIRECTION)


def node_ids(scene) -> list:
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def ijk_to_ras_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return arrayFromVTKMatrix(m)


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ------------------------------------------------------------------ volumes
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_volume_node_round_trip_keeps_array_dtype_and_oblique_geometry(scene, dtype):
    rng = np.random.default_rng(1)
    volume = oblique((rng.normal(size=(7, 9, 11)) * 100).astype(dtype))
    node = node_from_volume(volume, "oblique", scene)

    assert node.GetClassName() == "vtkMRMLScalarVolumeNode"
    np.testing.assert_allclose(node.GetOrigin(), [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]], atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), SPACING, atol=1e-9)
    ijk = np.array([3.0, 5.0, 2.0])
    ras = (ijk_to_ras_of(node) @ np.append(ijk, 1.0))[:3]
    lps = ORIGIN + DIRECTION @ (SPACING * ijk)
    np.testing.assert_allclose(ras, lps * FLIP, atol=1e-9)
    assert node.GetDisplayNode() is not None and node.GetDisplayNode().GetAutoWindowLevel()

    back = volume_from_node(node)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, SPACING, atol=1e-6)
    np.testing.assert_allclose(back.origin, ORIGIN, atol=1e-6)
    np.testing.assert_allclose(back.direction, DIRECTION, atol=1e-6)

    # A copy, not a view into VTK memory: editing the node leaves the Volume alone.
    slicer.util.arrayFromVolume(node)[:] = 0
    np.testing.assert_array_equal(back.array, volume.array)


def test_real_mrus_image_round_trips_through_a_node(scene, shared_data):
    path = shared_data / "mrus_prostate" / "fixed_images" / "obs000.nii.gz"
    image = Volume.read(path)
    back = volume_from_node(node_from_volume(image, "obs000", scene))
    assert back.array.dtype == image.array.dtype
    np.testing.assert_array_equal(back.array, image.array)
    for got, want in ((back.spacing, image.spacing), (back.origin, image.origin), (back.direction, image.direction)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_label_map_window_level_and_colour_options(scene):
    labels = oblique(np.arange(7 * 9 * 11, dtype=np.int64).reshape(7, 9, 11) % 4)
    label_node = node_from_volume(labels, "labels", scene, label=True)
    assert label_node.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    back = volume_from_node(label_node)
    assert back.array.dtype == np.int32  # Slicer cannot show 64-bit integer voxels
    np.testing.assert_array_equal(back.array, labels.array)

    colours = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "diverging")
    jacobian = node_from_volume(
        oblique(np.ones((7, 9, 11), np.float32)), "jac", scene, color_node_id=colours.GetID(), window=2.0, level=1.0
    )
    display = jacobian.GetDisplayNode()
    assert display.GetColorNodeID() == colours.GetID()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == (2.0, 1.0)

    count = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="not in the scene"):
        node_from_volume(labels, "x", scene, color_node_id="vtkMRMLColorTableNodeMissing")
    with pytest.raises(ValueError, match="integers"):
        node_from_volume(oblique(np.full((3, 3, 3), 0.5)), "x", scene, label=True)
    with pytest.raises(ValueError, match="one channel"):
        node_from_volume(oblique(np.zeros((2, 3, 3, 3))), "x", scene)
    assert scene.GetNumberOfNodes() == count


def test_volume_under_a_transform_must_be_hardened(scene):
    node = node_from_volume(oblique(np.zeros((3, 4, 5), np.float32)), "v", scene)
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "identity")
    node.SetAndObserveTransformNodeID(parent.GetID())
    assert volume_from_node(node).shape == (3, 4, 5)  # an identity parent changes nothing

    shift = np.eye(4)
    shift[:3, 3] = [5.0, 0.0, 0.0]
    parent.SetMatrixTransformToParent(vtkMatrixFromArray(shift))
    with pytest.raises(ValueError, match="harden the transform"):
        volume_from_node(node)


def test_default_scene_outside_slicer_is_a_clear_error():
    if hasattr(slicer, "mrmlScene"):
        pytest.skip("running inside Slicer, where the application scene exists")
    with pytest.raises(ValueError, match="pass scene="):
        node_from_volume(oblique(np.zeros((3, 3, 3))), "x")


# ------------------------------------------------------------ segmentations
@pytest.fixture
def real_labels(shared_data) -> Volume:
    """Gland (1) and, where it is not gland, the first landmark (2) of a real MR-US case, on an oblique grid."""
    channels = Volume.read(shared_data / "mrus_prostate" / "fixed_labels" / "obs000.nii.gz").array
    labels = np.zeros(channels.shape[1:], np.uint8)
    labels[channels[0] > 0.5] = 1
    labels[(channels[1] > 0.5) & (labels == 0)] = 2
    assert np.count_nonzero(labels == 1) > 10000 and np.count_nonzero(labels == 2) > 10
    return oblique(labels)


def test_segmentation_round_trip_on_an_oblique_grid(scene, real_labels):
    reference = node_from_volume(real_labels.with_array(np.zeros(real_labels.shape, np.float32)), "ref", scene)
    segmentation_node = segmentation_from_labels(real_labels, "prostate", scene)
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # temporary node removed
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    assert len(ids) == 2

    before = node_ids(scene)
    labels = labels_from_segmentation(segmentation_node, reference)
    assert node_ids(scene) == before
    assert labels.shape == real_labels.shape
    np.testing.assert_allclose(labels.origin, ORIGIN, atol=1e-6)
    np.testing.assert_allclose(labels.direction, DIRECTION, atol=1e-6)
    for value in (1, 2):
        assert np.count_nonzero(labels.array == value) == np.count_nonzero(real_labels.array == value)
        assert dice(labels.array == value, real_labels.array == value) == 1.0

    swapped = labels_from_segmentation(segmentation_node, reference, segment_ids=ids[::-1])
    np.testing.assert_array_equal(swapped.array == 1, real_labels.array == 2)
    np.testing.assert_array_equal(swapped.array == 2, real_labels.array == 1)


def test_segmentation_export_resamples_onto_another_grid(scene, real_labels):
    from priorreg.spatial import resample

    other = Volume(
        np.zeros((40, 50, 45), np.float32),
        SPACING * 1.25,
        ORIGIN + np.array([2.0, -3.0, 1.5]),
        rotation(25, -10, 35),
    )
    segmentation_node = segmentation_from_labels(real_labels, "prostate", scene)
    labels = labels_from_segmentation(segmentation_node, node_from_volume(other, "other", scene))
    assert labels.shape == other.shape
    expected = resample(real_labels, other).array
    assert dice(labels.array == 1, expected == 1) > 0.99


def test_empty_segmentation_is_a_clear_error_and_leaves_the_scene_alone(scene):
    reference = node_from_volume(oblique(np.zeros((5, 6, 7), np.float32)), "ref", scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    before = node_ids(scene)
    with pytest.raises(ValueError, match="no segments"):
        labels_from_segmentation(segmentation_node, reference)
    assert node_ids(scene) == before

    # A segment without voxels: the export runs, finds nothing, and cleans up after itself.
    segment = slicer.vtkSegment()
    segment.SetName("blank")
    blank = slicer.vtkOrientedImageData()
    blank.SetExtent(0, -1, 0, -1, 0, -1)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), blank)
    segmentation_node.GetSegmentation().AddSegment(segment)
    before = node_ids(scene)
    with pytest.raises(ValueError, match="no voxel"):
        labels_from_segmentation(segmentation_node, reference)
    assert node_ids(scene) == before
    with pytest.raises(ValueError, match="not among"):
        labels_from_segmentation(segmentation_node, reference, segment_ids=["nope"])


# -------------------------------------------------------------- transforms
SHAPE = (14, 17, 20)  # (K, J, I)


@pytest.fixture
def fixed_grid() -> Grid:
    return Grid(SHAPE, SPACING, ORIGIN, DIRECTION)


@pytest.fixture
def smooth_field(fixed_grid) -> Volume:
    """A smooth random displacement field, up to about 6 mm, on the fixed grid."""
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 3, 4, 4, dtype=torch.float64)
    u = F.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)
    u = u * (6.0 / u.abs().max())
    return field_volume(u, fixed_grid)


def random_points(grid: Grid, n: int, seed: int = 2) -> np.ndarray:
    """LPS points at random continuous indices inside the grid (not voxel centres)."""
    index = np.random.default_rng(seed).uniform(0, np.array(grid.shape[::-1]) - 1, size=(n, 3))
    m = grid.index_to_physical
    return index @ m[:3, :3].T + m[:3, 3]


def transform_lps(transform, points: np.ndarray) -> np.ndarray:
    """Map LPS points through a VTK transform that works in RAS, one point at a time."""
    return np.array([transform.TransformPoint(*(p * FLIP)) for p in points]) * FLIP


def test_constant_field_moves_ras_points_with_flipped_x_and_y(scene, fixed_grid):
    field = Volume(np.ones((3, *SHAPE)) * np.array([1.0, 2.0, 3.0])[:, None, None, None], SPACING, ORIGIN, DIRECTION)
    node = transform_node_from_field(field, "constant", scene)
    ras = np.array([10.0, 20.0, 30.0])
    np.testing.assert_allclose(node.GetTransformFromParent().TransformPoint(*ras), ras + [-1.0, -2.0, 3.0], atol=1e-9)


def test_grid_transform_node_maps_points_like_the_backend(scene, fixed_grid, smooth_field):
    node = transform_node_from_field(smooth_field, "deformation", scene)
    assert node.GetClassName() == "vtkMRMLGridTransformNode"

    points = random_points(fixed_grid, 300)
    moved_slicer = transform_lps(node.GetTransformFromParent(), points)
    u = sample(field_tensor(smooth_field, torch.float64), fixed_grid, torch.as_tensor(points)[None], padding="border")
    moved_backend = points + u[0].numpy().T
    assert np.abs(moved_backend - points).max() > 2.0  # the field really moves points
    assert np.abs(moved_slicer - moved_backend).max() < 0.05

    # Slicer inverts the grid for "to parent" (used for models and markups): back where we started.
    back = transform_lps(node.GetTransformToParent(), moved_slicer[:50])
    assert np.abs(back - points[:50]).max() < 0.05


def test_field_from_grid_transform_node_reproduces_the_field(scene, fixed_grid, smooth_field):
    fixed_node = node_from_volume(Volume(np.zeros(SHAPE, np.float32), SPACING, ORIGIN, DIRECTION), "fixed", scene)
    node = transform_node_from_field(smooth_field, "deformation", scene)
    for reference in (smooth_field, fixed_node):
        field = field_from_transform_node(node, reference)
        assert field.array.shape == (3, *SHAPE) and field.array.dtype == np.float64
        assert fixed_grid.matches(field, atol=1e-6)
        assert np.abs(field.array - smooth_field.array).max() < 0.05


def test_field_from_linear_transform_node_matches_affine_to_field(scene, fixed_grid):
    to_parent = np.eye(4)  # Slicer's stored direction: moving (child) -> fixed (parent), in RAS
    to_parent[:3, :3] = rotation(8, -5, 12)
    to_parent[:3, 3] = [4.0, -7.0, 2.5]
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    node.SetMatrixTransformToParent(vtkMatrixFromArray(to_parent))

    resampling_lps = np.diag([*FLIP, 1.0]) @ np.linalg.inv(to_parent) @ np.diag([*FLIP, 1.0])
    expected = affine_to_field(torch.as_tensor(resampling_lps), fixed_grid)[0].numpy()
    field = field_from_transform_node(node, fixed_grid)
    assert np.abs(expected).max() > 5.0
    assert np.abs(field.array - expected).max() < 0.05

    # Under a parent transform, a volume under the node is resampled through both.
    parent_to_world = np.eye(4)
    parent_to_world[:3, 3] = [0.0, 3.0, -6.0]
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "parent")
    parent.SetMatrixTransformToParent(vtkMatrixFromArray(parent_to_world))
    node.SetAndObserveTransformNodeID(parent.GetID())
    resampling_lps = np.diag([*FLIP, 1.0]) @ np.linalg.inv(parent_to_world @ to_parent) @ np.diag([*FLIP, 1.0])
    expected = affine_to_field(torch.as_tensor(resampling_lps), fixed_grid)[0].numpy()
    assert np.abs(field_from_transform_node(node, fixed_grid).array - expected).max() < 0.05


def test_transform_node_names_its_fixed_and_moving_volumes(scene, smooth_field):
    fixed = node_from_volume(Volume(np.zeros(SHAPE, np.float32), SPACING, ORIGIN, DIRECTION), "fixed", scene)
    moving = node_from_volume(Volume(np.ones(SHAPE, np.float32), SPACING, ORIGIN, DIRECTION), "moving", scene)
    node = transform_node_from_field(smooth_field, "deformation", scene, fixed_node=fixed, moving_node=moving)
    assert node.GetNodeReference(FIXED_VOLUME_ROLE).GetID() == fixed.GetID()
    assert node.GetNodeReference(MOVING_VOLUME_ROLE).GetID() == moving.GetID()
    assert transform_node_from_field(smooth_field, "plain", scene).GetNodeReference(FIXED_VOLUME_ROLE) is None

    elsewhere = slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", "elsewhere")
    before = node_ids(scene)
    with pytest.raises(ValueError, match="not in the scene"):
        transform_node_from_field(smooth_field, "bad", scene, fixed_node=elsewhere)
    with pytest.raises(ValueError, match="3 components"):
        transform_node_from_field(smooth_field.channel(0), "bad", scene)
    assert node_ids(scene) == before


# -------------------------------------------------------------- boundaries
def test_bridge_imports_without_slicer_and_backend_never_imports_slicer():
    code = "import sys, priorreg.slicer; assert not {'slicer', 'vtk'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)

    package = Path(__file__).resolve().parents[2] / "priorreg"
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "slicer" not in path.relative_to(package).parts[:1]
        and any(
            line.strip().startswith(("import slicer", "from slicer", "import vtk", "from vtk"))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []


def test_bridge_loads_without_torch():
    """The module panels must appear in a Slicer without torch: the bridge never imports it."""
    import subprocess
    import sys

    code = "import sys, priorreg.slicer; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
