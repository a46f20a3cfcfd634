"""The modules' logic (`priorreg.slicer.logic.register_nodes`) end to end on a real vtkMRMLScene.

Both modules' Logic classes delegate to `register_nodes` with the options built here
(AdversarialRegistration: method "adversarial" with model and device; DeepImagePriorReg:
method "dip" with similarity, init, device, levels, steps); the Logic classes themselves
need Slicer's application (`slicer.ScriptedLoadableModule`), which the slicer-core wheel does
not have, and run in the real-Slicer tier (their Test classes). Data: the first test-split
MR-US pair of the shared data, as nodes (`priorreg.slicer.sample.mrus_test_pair`, the same
nodes the Test classes use). The adversarial runs use the shipped model "adversarial_mrus".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402  (slicer-core brings vtk)
from slicer.util import arrayFromVTKMatrix  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from priorreg import data, metrics  # noqa: E402
from priorreg.jacobian import jacobian_stats, jacobian_volume  # noqa: E402
from priorreg.registration import Cancelled, register  # noqa: E402
from priorreg.slicer import (  # noqa: E402
    FIXED_VOLUME_ROLE,
    MOVING_VOLUME_ROLE,
    display_outputs,
    field_from_transform_node,
    labels_from_segmentation,
    logic,
    node_from_volume,
    register_nodes,
    volume_from_node,
)
from priorreg.slicer.sample import GLAND, mrus_test_pair, set_modality  # noqa: E402
from priorreg.spatial import Grid, field_tensor, resample, sample  # noqa: E402
from priorreg.volume import Volume  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
MODEL = "adversarial_mrus"
ADVERSARIAL = {"model": MODEL, "device": "cpu"}  # what AdversarialRegistrationLogic.register passes
QUALITY_MODEL = "airnet_mrus"  # and the critic it scores the result with
DIP = {"similarity": "mae", "init": "centres", "device": "cpu", "levels": (4,), "steps": (10,)}  # DeepImagePriorRegLogic


@pytest.fixture(scope="module")
def shipped_model():
    from priorreg.models import SHIPPED, available_models

    if MODEL not in available_models():
        pytest.fail(f"model {MODEL!r} not found: it ships as {SHIPPED / (MODEL + '.safetensors')} with its .json card")
    return MODEL


@pytest.fixture
def pair(shared_data):
    """A fresh scene holding the pair's nodes."""
    return mrus_test_pair(slicer.vtkMRMLScene(), shared_data)


@pytest.fixture(scope="module")
def adversarial(shared_data, shipped_model):
    """One adversarial run with segmentations, shared by the read-only checks: (pair, outputs, input states)."""
    pair = mrus_test_pair(slicer.vtkMRMLScene(), shared_data)
    inputs = (pair.fixed, pair.moving, pair.fixed_segmentation, pair.moving_segmentation)
    before = [state(n) for n in inputs]
    outputs = register_nodes(
        pair.fixed, pair.moving, "adversarial", ADVERSARIAL, pair.fixed_segmentation, pair.moving_segmentation,
        scene=pair.scene, quality_model=QUALITY_MODEL,
    )
    return pair, outputs, before


# ------------------------------------------------------------------------------------ helpers
def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return arrayFromVTKMatrix(m)


def state(node) -> dict:
    """What a registration must not change about an input node."""
    s = {
        "class": node.GetClassName(),
        "name": node.GetName(),
        "transform": node.GetTransformNodeID(),
        "display": [node.GetNthDisplayNodeID(n) for n in range(node.GetNumberOfDisplayNodes())],
        "storage": node.GetStorageNodeID(),
        "references": {
            node.GetNthNodeReferenceRole(r): [
                node.GetNthNodeReferenceID(node.GetNthNodeReferenceRole(r), n)
                for n in range(node.GetNumberOfNodeReferences(node.GetNthNodeReferenceRole(r)))
            ]
            for r in range(node.GetNumberOfNodeReferenceRoles())
        },
    }
    if node.IsA("vtkMRMLScalarVolumeNode"):
        s["ijk_to_ras"] = ijk_to_ras(node)
        s["array"] = slicer.util.arrayFromVolume(node).copy()
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            image = segment.GetRepresentation(name)
            s[f"segment {n}"] = (
                segmentation.GetNthSegmentID(n), segment.GetName(), segment.GetColor(), image.GetExtent(),
                numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).copy(),
            )
    return s


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        elif isinstance(a[key], tuple):
            assert a[key][:-1] == b[key][:-1], key
            np.testing.assert_array_equal(a[key][-1], b[key][-1], err_msg=key)
        else:
            assert a[key] == b[key], key


def random_ras_points(node, n: int, seed: int = 0) -> np.ndarray:
    """RAS points at random continuous indices inside a volume node's grid."""
    dims = np.array(node.GetImageData().GetDimensions(), dtype=np.float64)
    ijk = np.random.default_rng(seed).uniform(0, dims - 1, size=(n, 3))
    m = ijk_to_ras(node)
    return ijk @ m[:3, :3].T + m[:3, 3]


def backend_moved_ras(result, ras: np.ndarray) -> np.ndarray:
    """phi(x) = x + u(x) of the backend's field (trilinear, border), for RAS points."""
    lps = ras * FLIP
    u = sample(field_tensor(result.field, torch.float64), Grid.of(result.field), torch.as_tensor(lps)[None], padding="border")
    return (lps + u[0].numpy().T) * FLIP


def mrb_round_trip(scene, path):
    """`scene` written to `path` with `WriteToMRB` and read back into a new scene, which is returned.

    Reading an MRB unpacks into the scene's cache folder, which Slicer's application logic sets
    up; a bare scene has none, so the new scene gets a data IO manager with a cache manager.
    """
    assert scene.WriteToMRB(str(path)) and path.is_file()
    reloaded = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    (path.parent / "cache").mkdir()
    cache.SetRemoteCacheDirectory(str(path.parent / "cache"))
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    reloaded.SetDataIOManager(io)
    reloaded.SetCacheManager(cache)
    assert reloaded.ReadFromMRB(str(path))
    return reloaded


def table_row(table) -> dict:
    out = {}
    for c in range(table.GetNumberOfColumns()):
        name = table.GetColumnName(c)
        text = table.GetCellText(0, c)
        out[name] = text if table.GetColumnType(name) == vtk.VTK_STRING else float(text)
    return out


def check_outputs(pair, outputs, method: str) -> None:
    """Classes, geometry, references and the transform's mapping, for any method's outputs."""
    scene = pair.scene
    result = outputs.result
    assert outputs.warped_volume.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert outputs.transform.GetClassName() == "vtkMRMLGridTransformNode"
    assert outputs.jacobian.GetClassName() == "vtkMRMLScalarVolumeNode"
    assert outputs.metrics.GetClassName() == "vtkMRMLTableNode"
    assert outputs.warped_segmentation.GetClassName() == "vtkMRMLSegmentationNode"
    assert all(node.GetScene() is scene for node in outputs.nodes())

    for node in (outputs.warped_volume, outputs.jacobian):
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(pair.fixed), atol=1e-6)
        assert node.GetImageData().GetDimensions() == pair.fixed.GetImageData().GetDimensions()
    np.testing.assert_array_equal(volume_from_node(outputs.warped_volume).array, result.warped.array)
    np.testing.assert_allclose(volume_from_node(outputs.jacobian).array, jacobian_volume(result.field).array)

    assert outputs.transform.GetNodeReferenceID(FIXED_VOLUME_ROLE) == pair.fixed.GetID()
    assert outputs.transform.GetNodeReferenceID(MOVING_VOLUME_ROLE) == pair.moving.GetID()
    ras = random_ras_points(pair.fixed, 300)
    from_parent = outputs.transform.GetTransformFromParent()
    moved = np.array([from_parent.TransformPoint(*p) for p in ras])
    expected = backend_moved_ras(result, ras)
    assert np.abs(expected - ras).max() > 1.0  # the field does move points
    assert np.abs(moved - expected).max() < 0.1
    field = field_from_transform_node(outputs.transform, pair.fixed)
    assert np.abs(field.array - result.field.array).max() < 0.1

    row = table_row(outputs.metrics)
    assert row["method"] == result.method and row["method"].startswith(method)
    assert row["seconds"] == pytest.approx(result.seconds, rel=1e-4)
    for key, value in jacobian_stats(result.field).items():
        assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    assert outputs.metrics.GetColumnUnitLabel("folding_pct") == "%"


def gland_dice_from_nodes(pair, outputs) -> float:
    fixed = labels_from_segmentation(pair.fixed_segmentation, pair.fixed)
    warped = labels_from_segmentation(outputs.warped_segmentation, pair.fixed)
    return metrics.dice(fixed, warped, labels=[1])[1]


def gland_dice_backend(pair, result) -> float:
    """The evaluation's gland Dice (priorreg.evaluate): channel 0 at 0.5, warped through the field."""
    fixed = data.binary_channels(pair.volumes.fixed_labels).channel(0)
    moving = data.binary_channels(pair.volumes.moving_labels).channel(0)
    return metrics.dice(fixed, resample(moving, fixed, result.field), labels=[1])[1]


# ---------------------------------------------------------------------------------- adversarial
def test_adversarial_outputs_have_the_right_classes_geometry_references_and_mapping(adversarial):
    pair, outputs, _ = adversarial
    check_outputs(pair, outputs, "adversarial")
    segmentation = outputs.warped_segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == GLAND


def test_warped_gland_dice_from_the_nodes_equals_the_backends(adversarial):
    pair, outputs, _ = adversarial
    from_nodes = gland_dice_from_nodes(pair, outputs)
    backend = gland_dice_backend(pair, outputs.result)
    assert 0.2 < backend < 1.0
    assert from_nodes == pytest.approx(backend, abs=1e-12)
    row = table_row(outputs.metrics)
    assert row[f"dice {GLAND}"] == pytest.approx(backend, abs=1e-6)
    assert row["dice_mean"] == pytest.approx(backend, abs=1e-6)


def test_jacobian_map_uses_a_diverging_table_centred_on_one_with_folding_marked(adversarial):
    pair, outputs, _ = adversarial
    display = outputs.jacobian.GetDisplayNode()
    colours = display.GetColorNode()
    assert colours.GetName() == logic.JACOBIAN_COLOR_NAME
    assert not display.GetAutoWindowLevel()
    assert display.GetLevel() == 1.0 and display.GetWindow() == 2.0  # det J in [0, 2]: 1 at the centre
    n = colours.GetNumberOfColors()
    rgba = np.array([colours.GetLookupTable().GetTableValue(i) for i in range(n)])
    np.testing.assert_allclose(rgba[0, :3], logic.FOLDING_RGB, atol=1 / 255)  # det J <= 0 (8-bit table)
    centre = rgba[n // 2, :3]
    assert centre.min() > 0.9  # white near det J = 1
    assert rgba[n // 4, 2] > rgba[n // 4, 0] and rgba[3 * n // 4, 0] > rgba[3 * n // 4, 2]  # blue below, red above

    # Another result in the scene shares the table; the identity's map is det J = 1 everywhere.
    identity = register_nodes(
        pair.fixed, pair.moving, "identity", {}, pair.fixed_segmentation, pair.moving_segmentation, scene=pair.scene
    )
    assert pair.scene.GetNodesByName(logic.JACOBIAN_COLOR_NAME).GetNumberOfItems() == 1
    assert identity.jacobian.GetDisplayNode().GetColorNodeID() == colours.GetID()
    np.testing.assert_allclose(slicer.util.arrayFromVolume(identity.jacobian), 1.0, atol=1e-6)


def test_the_result_is_scored_and_the_score_is_in_the_metrics_table(adversarial):
    from priorreg.quality import QualityModel, quality_report

    pair, outputs, _ = adversarial
    result = outputs.result
    fixed = volume_from_node(pair.fixed)
    expected = quality_report(fixed, result.warped, result.field, model=QualityModel(QUALITY_MODEL, device="cpu"))
    assert outputs.quality["verdict"] == expected["verdict"] in ("good", "check", "failed")
    assert outputs.quality["d_score"] == pytest.approx(expected["d_score"], rel=1e-5)
    row = table_row(outputs.metrics)
    assert row["verdict"] == expected["verdict"]
    assert row["tre_estimate_mm"] == pytest.approx(expected["tre_estimate_mm"], rel=1e-4)
    assert 0 <= row["plausibility"] <= 1


def test_inputs_are_not_modified(adversarial):
    pair, _, before = adversarial
    for node, was in zip((pair.fixed, pair.moving, pair.fixed_segmentation, pair.moving_segmentation), before):
        assert_same_state(was, state(node))


def test_display_outputs_sets_the_overlay_and_the_deformation_grid(adversarial):
    pair, outputs, _ = adversarial
    scene = pair.scene
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    display_outputs(outputs, pair.fixed, opacity=0.3)  # no layout manager here: views are not fitted
    for view in views:
        assert view.GetBackgroundVolumeID() == pair.fixed.GetID()
        assert view.GetForegroundVolumeID() == outputs.warped_volume.GetID()
        assert view.GetForegroundOpacity() == pytest.approx(0.3)
    display = outputs.transform.GetDisplayNode()
    assert display.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert display.GetRegionNode().GetID() == pair.fixed.GetID()
    assert display.GetVisibility() and display.GetVisibility2D() and not display.GetVisibility3D()
    assert 1.0 <= display.GetGridSpacingMm() <= 20.0
    logic.set_foreground_opacity(scene, 0.8)
    assert [v.GetForegroundOpacity() for v in views] == pytest.approx([0.8] * 3)


def test_scene_saves_as_mrb_and_reloads_with_the_same_outputs(pair, shipped_model, tmp_path):
    """Saved with `vtkMRMLScene.WriteToMRB`, read back with `ReadFromMRB`.

    `slicer.util.saveScene` needs `slicer.app` (the application's IO manager), absent from the
    wheel; the scene's own `WriteToMRB` works as it is (see `mrb_round_trip` for the reading side).
    """
    scene = pair.scene
    outputs = register_nodes(pair.fixed, pair.moving, "adversarial", ADVERSARIAL, pair.fixed_segmentation, pair.moving_segmentation, scene=scene)
    reloaded = mrb_round_trip(scene, tmp_path / "registered.mrb")

    def again(node):
        found = reloaded.GetNodeByID(node.GetID())
        assert found is not None and found.GetClassName() == node.GetClassName() and found.GetName() == node.GetName()
        return found

    fixed, moving = again(pair.fixed), again(pair.moving)
    for node in (outputs.warped_volume, outputs.jacobian):
        back = again(node)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), slicer.util.arrayFromVolume(node))
        np.testing.assert_allclose(ijk_to_ras(back), ijk_to_ras(node), atol=1e-6)
    transform = again(outputs.transform)
    assert transform.GetNodeReference(FIXED_VOLUME_ROLE) is fixed
    assert transform.GetNodeReference(MOVING_VOLUME_ROLE) is moving
    # At the fixed grid's voxel centres (the grid's own nodes) the reloaded transform gives the field back.
    assert np.abs(field_from_transform_node(transform, fixed).array - outputs.result.field.array).max() < 0.1
    saved, back = table_row(outputs.metrics), table_row(again(outputs.metrics))
    assert back.keys() == saved.keys()
    for key, value in saved.items():
        assert back[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5)), key
    jacobian = again(outputs.jacobian)
    assert jacobian.GetDisplayNode().GetColorNode().GetName() == logic.JACOBIAN_COLOR_NAME
    segmentation = again(outputs.warped_segmentation).GetSegmentation()
    assert segmentation.GetNthSegment(0).GetName() == GLAND
    assert metrics.dice(
        labels_from_segmentation(again(pair.fixed_segmentation), fixed),
        labels_from_segmentation(again(outputs.warped_segmentation), fixed), labels=[1],
    )[1] == pytest.approx(gland_dice_from_nodes(pair, outputs), abs=1e-12)


def test_cancel_during_the_method_leaves_the_scene_as_it_was(pair, shipped_model):
    scene = pair.scene
    before = node_ids(scene)
    reports = []
    with pytest.raises(Cancelled):
        register_nodes(
            pair.fixed, pair.moving, "adversarial", {**ADVERSARIAL, "finetune_steps": 3}, pair.fixed_segmentation,
            pair.moving_segmentation, scene=scene, progress=reports.append, cancel=lambda: bool(reports),
        )
    assert [r.stage for r in reports] == ["fine-tune"]  # cancelled at the first call after the first report
    assert node_ids(scene) == before


@pytest.mark.parametrize("fail", ["cancel", "error"])
def test_cancel_or_error_while_making_outputs_removes_every_node_of_the_run(pair, shipped_model, fail):
    """Stopped after the warped volume, transform and Jacobian (and its colour table) exist."""
    scene = pair.scene
    before = node_ids(scene)
    stages = []

    def progress(report):
        stages.append(report.stage)
        if report.stage == "outputs: segmentation" and fail == "error":
            raise RuntimeError("disk full")

    with pytest.raises(Cancelled if fail == "cancel" else RuntimeError):
        register_nodes(
            pair.fixed, pair.moving, "adversarial", ADVERSARIAL, pair.fixed_segmentation, pair.moving_segmentation,
            scene=scene, progress=progress, cancel=lambda: "outputs: Jacobian" in stages[-1:] and fail == "cancel",
        )
    assert "outputs: Jacobian" in stages
    assert node_ids(scene) == before
    assert scene.GetFirstNodeByName(logic.JACOBIAN_COLOR_NAME) is None


def _blank_segmentation(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "blank")
    segment = slicer.vtkSegment()
    segment.SetName(GLAND)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, -1, 0, -1, 0, -1)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
    node.GetSegmentation().AddSegment(segment)
    return node


BAD_INPUTS = {
    "no fixed volume": (lambda p, s: dict(fixed_node=None), "no fixed volume: select one"),
    "no moving volume": (lambda p, s: dict(moving_node=None), "no moving volume: select one"),
    "2D volume": (
        lambda p, s: dict(moving_node=node_from_volume(Volume(np.zeros((1, 40, 50), np.float32)), "slice", s)),
        r"moving volume 'slice' is 2D \(50 x 40 x 1 voxels\)",
    ),
    "label map": (
        lambda p, s: dict(fixed_node=node_from_volume(Volume(np.ones((4, 5, 6), np.uint8)), "mask", s, label=True)),
        "must be a scalar volume",
    ),
    "same node twice": (lambda p, s: dict(moving_node=p.fixed), "selected as both fixed and moving"),
    "segmentation without segments": (
        lambda p, s: dict(moving_segmentation=s.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")),
        "segmentation 'nothing' is empty: it has no segments",
    ),
    "all-empty segmentation": (
        lambda p, s: dict(moving_segmentation=_blank_segmentation(s)), "segmentation 'blank'.* no voxel"
    ),
    "one-sided segmentation": (lambda p, s: dict(moving_segmentation=None), "only the fixed segmentation was given"),
    "unmatched segment names": (
        lambda p, s: dict(segment_ids=None, moving_segmentation=_renamed(p.moving_segmentation, "prostate")),
        "share no segment name",
    ),
    "unknown option": (lambda p, s: dict(options={**ADVERSARIAL, "iterations": 3}), "has no option iterations"),
    "unknown model": (lambda p, s: dict(options={**ADVERSARIAL, "model": "no_such_model"}), "no model named 'no_such_model'"),
    "unknown quality model": (lambda p, s: dict(quality_model="no_such_critic"), "no model named 'no_such_critic'"),
    "fine-tuning without segmentations": (
        lambda p, s: dict(options={**ADVERSARIAL, "finetune_steps": 5}, fixed_segmentation=None, moving_segmentation=None),
        "fine-tuning on this pair needs fixed and moving segmentations",
    ),
}
if not torch.cuda.is_available():
    BAD_INPUTS["CUDA without a GPU"] = (lambda p, s: dict(options={**ADVERSARIAL, "device": "cuda"}), "no CUDA GPU is available")


def _renamed(segmentation_node, name):
    segmentation_node.GetSegmentation().GetNthSegment(0).SetName(name)
    return segmentation_node


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_clear_errors_and_change_nothing(pair, case):
    scene = pair.scene
    make, message = BAD_INPUTS[case]
    args = dict(
        fixed_node=pair.fixed, moving_node=pair.moving, method="adversarial", options=ADVERSARIAL,
        fixed_segmentation=pair.fixed_segmentation, moving_segmentation=pair.moving_segmentation, scene=scene,
    )
    args.update(make(pair, scene))
    before = node_ids(scene)
    states = [state(n) for n in (pair.fixed, pair.moving, pair.fixed_segmentation, pair.moving_segmentation)]
    with pytest.raises(ValueError, match=message):
        register_nodes(**args)
    assert node_ids(scene) == before
    for node, was in zip((pair.fixed, pair.moving, pair.fixed_segmentation, pair.moving_segmentation), states):
        assert_same_state(was, state(node))


@pytest.mark.parametrize("role, modality", [("fixed", "CT"), ("moving", "US")])
def test_a_model_for_other_modalities_is_a_clear_error(pair, shipped_model, role, modality):
    """The DICOM modality Slicer records for a series is checked against the model card's training data."""
    scene = pair.scene
    set_modality(pair.fixed if role == "fixed" else pair.moving, modality)
    before = node_ids(scene)
    with pytest.raises(ValueError, match=rf"trained on mrus_prostate.*US fixed and MR moving.*the {role} volume .* is {modality}"):
        register_nodes(pair.fixed, pair.moving, "adversarial", ADVERSARIAL, scene=scene)
    assert node_ids(scene) == before


def test_model_summary_says_what_the_model_was_trained_on(shipped_model):
    summary = logic.model_summary(logic.model_card(shipped_model))
    assert summary.startswith("adversarial network trained on mrus_prostate")


# ------------------------------------------------------------------------------ deep image prior
def test_dip_with_a_tiny_schedule_reports_progress_and_makes_the_outputs(pair):
    reports = []
    outputs = register_nodes(
        pair.fixed, pair.moving, "dip", DIP, pair.fixed_segmentation, pair.moving_segmentation,
        scene=pair.scene, progress=reports.append,
    )
    optimisation = [r for r in reports if r.stage.startswith("dip")]
    assert [r.step for r in optimisation] == list(range(1, 11))
    assert all(r.total == 10 and np.isfinite(r.loss) for r in optimisation)
    assert [r.stage for r in reports[len(optimisation):]] == [
        "outputs: warped volume", "outputs: transform", "outputs: Jacobian", "outputs: segmentation", "outputs: metrics"
    ]
    check_outputs(pair, outputs, "dip")
    assert gland_dice_from_nodes(pair, outputs) == pytest.approx(gland_dice_backend(pair, outputs.result), abs=1e-12)
    assert table_row(outputs.metrics)["options"] == "device=cpu; init=centres; levels=(4,); similarity=mae; steps=(10,)"


def test_dip_panel_schedule_text_is_parsed_or_rejected_clearly():
    assert logic.parse_schedule("4, 2,1", "200,100, 50") == ((4.0, 2.0, 1.0), (200, 100, 50))
    for levels, steps, message in (("4, x", "1, 2", "numbers separated"), ("0.5", "10", ">= 1"), ("2, 1", "30", "one count per level")):
        with pytest.raises(ValueError, match=message):
            logic.parse_schedule(levels, steps)


# ------------------------------------------------------------------------------ predicted glands
def test_the_glands_model_is_offered_and_registers_from_the_images_alone(pair, shared_data):
    assert "glands_mrus" in logic.registration_models()
    assert "validation gland Dice" in logic.model_summary(logic.model_card("glands_mrus"))
    before = node_ids(pair.scene)
    outputs = register_nodes(pair.fixed, pair.moving, "glands", {"model": "glands_mrus", "device": "cpu"}, scene=pair.scene)
    assert outputs.result.method == "glands" and outputs.warped_segmentation is None
    assert len(node_ids(pair.scene)) > len(before)
    # the transform node's field is the backend's, and it aligns the expert glands and landmarks it never saw
    v = data.split_by_patient(data.mrus_pairs(shared_data))["test"][0].load()
    field = field_from_transform_node(outputs.transform, Grid.of(v.fixed))
    assert np.abs(field.array - outputs.result.field.array).max() < 1e-3
    gland = data.binary_channels(v.moving_labels).channel(0)
    warped = resample(gland, v.fixed, field)
    dice = metrics.dice(data.binary_channels(v.fixed_labels).channel(0), warped, labels=[1])[1]
    tre = metrics.landmark_tre(field, v.fixed_labels, v.moving_labels)["rms"]
    centred = metrics.landmark_tre(register(v.fixed, v.moving, "centres").field, v.fixed_labels, v.moving_labels)["rms"]
    assert dice > 0.75 and tre < centred - 1.0  # shipped: Dice 0.78, landmark RMS TRE 7.7 mm from centring's 9.3
    # with the scene's segmentations their first segments (the expert glands) replace the predictions, and the
    # segmentation warped for the user is theirs (every segment), not the gland channel the method registered
    given = register_nodes(
        pair.fixed, pair.moving, "glands", {"model": "glands_mrus", "device": "cpu"}, pair.fixed_segmentation, pair.moving_segmentation,
        scene=pair.scene,
    )  # fmt: skip
    assert np.abs(given.result.field.array - outputs.result.field.array).max() > 0.5
    warped = given.warped_segmentation.GetSegmentation()
    assert warped.GetNumberOfSegments() == pair.moving_segmentation.GetSegmentation().GetNumberOfSegments()
