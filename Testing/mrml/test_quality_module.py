"""RegQualityScore's logic (`priorreg.slicer.quality.score_nodes`) end to end on a real vtkMRMLScene.

`RegQualityScoreLogic.score` passes its arguments straight to `score_nodes`; the Logic class
needs Slicer's application and runs in the real-Slicer tier (`RegQualityScoreTest`, the same
flows). Data: the first test-split MR-US pair as nodes (`priorreg.slicer.sample.mrus_test_pair`).

The scores come from AIR-net's critic, `quality_model` below: the shipped `airnet_mrus`, or
until it ships a stand-in with random weights and a made-up calibration. So these tests check
plumbing (nodes, geometry, references, the table equal to `quality_report` on the same
Volumes, the indicator's text), never whether a score is good; the backend's tests do that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer")
from slicer.util import vtkMatrixFromArray
from test_modules import assert_same_state, ijk_to_ras, mrb_round_trip, node_ids, state

from priorreg import models, quality
from priorreg.registration import Cancelled
from priorreg.slicer import (
    FIXED_VOLUME_ROLE,
    MOVING_VOLUME_ROLE,
    labels_from_segmentation,
    logic,
    node_from_volume,
    transform_node_from_field,
    volume_from_node,
)
from priorreg.slicer import quality as bridge
from priorreg.slicer.sample import mrus_test_pair
from priorreg.spatial import Grid, field_volume, resample
from priorreg.volume import Volume

MODEL = bridge.DEFAULT_MODEL
FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
SHIFT_LPS = np.array([3.0, -2.0, 4.0])  # mm: the known displacement of the grid transform


def _save_stand_in_airnet(folder) -> None:
    """An AIR-net model with random weights and a calibration fitted to made-up numbers."""
    from priorreg.methods import airnet as air
    from priorreg.methods.adversarial import ModelFrame

    card = air.model_card(ModelFrame(), 8, 3, "rigid", "centres", {"rotation_deg": 25.0, "translation_mm": 5.0})
    torch.manual_seed(0)
    generator, critic = air.build_networks(card)
    scores = np.linspace(-1.0, 1.0, 40)
    tre = 6.0 - 4.0 * scores + np.random.default_rng(0).normal(0.0, 1.0, 40)
    card["calibration"] = quality.fit_calibration(scores, tre)
    card["thresholds_mm"] = quality.THRESHOLDS_MM
    tensors = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    tensors.update({f"critic.{k}": v for k, v in critic.state_dict().items()})
    models.save_model(folder / MODEL, tensors, card)


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory):
    """AIR-net's critic, loaded once: the shipped model, or until it ships a random-weight stand-in.

    The stand-in lies in a temporary folder that PRIORREG_MODELS points to while this module's
    tests run, so that `score_nodes(model="airnet_mrus")` finds it by name too. Once
    Resources/Models/airnet_mrus.* is committed the first branch is always taken, and
    `_save_stand_in_airnet` can go.
    """
    if (models.SHIPPED / f"{MODEL}.safetensors").is_file():
        yield quality.QualityModel(MODEL)
        return
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("models")
        _save_stand_in_airnet(folder)
        patch.setenv("PRIORREG_MODELS", str(folder))
        yield quality.QualityModel(MODEL)


@pytest.fixture(scope="module")
def pair(shared_data):
    """The pair's nodes in one scene for the whole module: every test leaves the inputs as they were."""
    return mrus_test_pair(slicer.vtkMRMLScene(), shared_data)


@pytest.fixture(scope="module")
def shift(pair):
    """A translation by SHIFT_LPS on the fixed grid, and the moving volume resampled through it by the backend."""
    grid = Grid.of(pair.volumes.fixed)
    u = torch.as_tensor(SHIFT_LPS).view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape)
    field = field_volume(u.contiguous(), grid)
    return field, resample(pair.volumes.moving, field, field, mode="linear")


# ------------------------------------------------------------------------------------ helpers
def table_rows(table) -> dict[str, tuple[str, str]]:
    """metric -> (value text, unit)."""
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(bridge.TABLE_COLUMNS)
    return {table.GetCellText(r, 0): (table.GetCellText(r, 1), table.GetCellText(r, 2)) for r in range(table.GetNumberOfRows())}


def assert_table_shows(table, report: dict, expected: dict) -> None:
    """The table holds `report` (the one score_nodes returned), and its values equal `expected`'s (a backend report)."""
    rows = table_rows(table)
    flat = {k: v for k, v in report.items() if k not in ("tre_interval_mm", "reasons")}
    flat["tre_interval_low_mm"], flat["tre_interval_high_mm"] = report["tre_interval_mm"]
    assert set(rows) == set(flat) | {"reasons"}
    assert list(rows)[:5] == ["verdict", "tre_estimate_mm", "tre_interval_low_mm", "tre_interval_high_mm", "d_score"]
    assert rows["verdict"][0] == report["verdict"] == expected["verdict"]
    assert rows["reasons"][0] == "; ".join(report["reasons"]) == "; ".join(expected["reasons"])
    for key, value in flat.items():
        if key != "verdict":
            assert float(rows[key][0]) == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
            assert rows[key][1] == bridge.METRICS[key][0], key
    assert report.keys() == expected.keys()
    for key in set(report) - {"verdict", "reasons", "seconds"}:
        assert report[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9, nan_ok=True), key


def assert_on_fixed_grid(node, fixed) -> None:
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(fixed), atol=1e-6)
    assert node.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()


def gland_labels(pair, side: str, grid_of=None) -> Volume:
    """The gland labels as the bridge exports them: from a segmentation node onto a volume node's grid."""
    segmentation = pair.fixed_segmentation if side == "fixed" else pair.moving_segmentation
    return labels_from_segmentation(segmentation, grid_of or (pair.fixed if side == "fixed" else pair.moving))


# ------------------------------------------------------------------------------ (a) warped volume
def test_warped_volume_gives_a_table_equal_to_the_backend_report(pair, shift, quality_model):
    """Any tool's warped volume (here the backend's, on the fixed grid), with segmentations, no transform."""
    scene = pair.scene
    warped_node = node_from_volume(shift[1], "warped by another tool", scene)
    inputs = (pair.fixed, warped_node, pair.fixed_segmentation, pair.moving_segmentation)
    before, states = node_ids(scene), [state(n) for n in inputs]
    outputs = bridge.score_nodes(
        pair.fixed, warped_node, fixed_segmentation=pair.fixed_segmentation, warped_segmentation=pair.moving_segmentation,
        model=quality_model,
    )
    assert outputs.jacobian is None and outputs.warped_volume is None
    assert node_ids(scene) == before + [outputs.table.GetID()]
    assert outputs.table.GetClassName() == "vtkMRMLTableNode" and outputs.table.GetName() == "warped by another tool quality"
    for node, was in zip(inputs, states):
        assert_same_state(was, state(node))

    expected = quality.quality_report(
        volume_from_node(pair.fixed), volume_from_node(warped_node),
        fixed_labels=gland_labels(pair, "fixed"), warped_labels=gland_labels(pair, "moving", grid_of=pair.fixed),
        model=quality_model,
    )
    assert "dice_mean" in expected and "folding_pct" not in expected
    assert_table_shows(outputs.table, outputs.report, expected)
    assert outputs.table.GetNodeReferenceID(FIXED_VOLUME_ROLE) == pair.fixed.GetID()
    assert outputs.table.GetNodeReferenceID(bridge.WARPED_VOLUME_ROLE) == warped_node.GetID()
    assert outputs.table.GetNodeReference(bridge.TRANSFORM_ROLE) is None

    # The model by name (what the Logic passes) scores the same.
    by_name = bridge.score_nodes(pair.fixed, warped_node, model=MODEL, plausibility=None)
    assert by_name.report["d_score"] == pytest.approx(expected["d_score"], rel=1e-6)


def test_the_indicator_says_the_verdict_and_the_estimate():
    report = {"verdict": "check", "tre_estimate_mm": 4.96, "tre_interval_mm": [3.04, 6.55], "reasons": ["the field folds (0.20% of voxels have det J <= 0)"]}
    assert bridge.verdict_text(report) == "check: estimated TRE 5.0 mm (80%: 3.0 to 6.5)\nthe field folds (0.20% of voxels have det J <= 0)"
    no_estimate = {"verdict": "check", "tre_estimate_mm": float("nan"), "tre_interval_mm": [float("nan")] * 2, "reasons": []}
    assert bridge.verdict_text(no_estimate) == "check: no TRE estimate"
    assert set(bridge.VERDICT_COLORS) == set(quality.VERDICTS)


def test_indicator_and_summary_of_a_scored_pair(pair, quality_model):
    outputs = bridge.score_nodes(pair.fixed, pair.moving, model=quality_model, plausibility=None)
    report = outputs.report
    low, high = report["tre_interval_mm"]
    assert bridge.verdict_text(report).splitlines()[0] == (
        f"{report['verdict']}: estimated TRE {report['tre_estimate_mm']:.1f} mm (80%: {low:.1f} to {high:.1f})"
    )
    summary = bridge.critic_summary(quality_model.airnet.card)
    assert summary.startswith("airnet network trained on") and "calibrated on" in summary


# ------------------------------------------------------------------------ (b) moving + transform
def test_moving_and_grid_transform_score_like_the_backend_warped_volume(pair, shift, quality_model):
    scene = pair.scene
    field, warped = shift
    transform = transform_node_from_field(field, "shift", scene)
    inputs = (pair.fixed, pair.moving, transform, pair.fixed_segmentation, pair.moving_segmentation)
    before, states = node_ids(scene), [state(n) for n in inputs]
    outputs = bridge.score_nodes(
        pair.fixed, moving_node=pair.moving, transform_node=transform, fixed_segmentation=pair.fixed_segmentation,
        moving_segmentation=pair.moving_segmentation, model=quality_model,
    )
    created = [n.GetID() for n in outputs.nodes()]
    assert node_ids(scene)[: len(before)] == before and set(node_ids(scene)[len(before):]) >= set(created)
    for node, was in zip(inputs, states):
        assert_same_state(was, state(node))

    expected = quality.quality_report(
        pair.volumes.fixed, warped, field, fixed_labels=gland_labels(pair, "fixed"),
        warped_labels=resample(gland_labels(pair, "moving"), field, field), model=quality_model,
    )
    assert outputs.report["d_score"] == pytest.approx(expected["d_score"], rel=1e-3, abs=1e-5)
    assert outputs.report["dice_mean"] == pytest.approx(expected["dice_mean"], abs=1e-3)
    assert_table_shows(outputs.table, outputs.report, outputs.report)
    assert float(table_rows(outputs.table)["detj_mean"][0]) == pytest.approx(1.0, abs=1e-4)

    assert_on_fixed_grid(outputs.jacobian, pair.fixed)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs.jacobian), 1.0, atol=1e-4)
    display = outputs.jacobian.GetDisplayNode()
    assert display.GetColorNode().GetName() == logic.JACOBIAN_COLOR_NAME
    assert (display.GetWindow(), display.GetLevel()) == (logic.JACOBIAN_WINDOW, logic.JACOBIAN_LEVEL)

    assert_on_fixed_grid(outputs.warped_volume, pair.fixed)
    np.testing.assert_allclose(volume_from_node(outputs.warped_volume).array, warped.array, atol=1e-3 * np.abs(warped.array).max())
    table = outputs.table
    assert table.GetName() == f"{pair.moving.GetName()} through shift quality"
    assert table.GetNodeReferenceID(MOVING_VOLUME_ROLE) == pair.moving.GetID()
    assert table.GetNodeReferenceID(bridge.TRANSFORM_ROLE) == transform.GetID()
    assert table.GetNodeReferenceID(bridge.WARPED_VOLUME_ROLE) == outputs.warped_volume.GetID()


def test_a_linear_transform_works_both_ways(pair, shift, quality_model):
    """A vtkMRMLLinearTransformNode translating the moving volume by -SHIFT (to parent) resamples it by +SHIFT."""
    scene = pair.scene
    field, warped = shift
    to_parent = np.eye(4)
    to_parent[:3, 3] = -SHIFT_LPS * FLIP  # RAS
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    transform.SetMatrixTransformToParent(vtkMatrixFromArray(to_parent))
    expected = quality.quality_report(pair.volumes.fixed, warped, field, model=quality_model)

    through = bridge.score_nodes(pair.fixed, moving_node=pair.moving, transform_node=transform, model=quality_model)
    warped_node = node_from_volume(warped, "warped", scene)
    given = bridge.score_nodes(pair.fixed, warped_node, transform_node=transform, model=quality_model)
    assert given.warped_volume is None
    for outputs in (through, given):
        assert outputs.report["d_score"] == pytest.approx(expected["d_score"], rel=1e-3, abs=1e-5)
        assert outputs.report["plausibility"] == pytest.approx(expected["plausibility"], abs=1e-3)
        assert_table_shows(outputs.table, outputs.report, outputs.report)
        assert_on_fixed_grid(outputs.jacobian, pair.fixed)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs.jacobian), 1.0, atol=1e-4)
    assert given.table.GetNodeReferenceID(bridge.TRANSFORM_ROLE) == transform.GetID()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(given.jacobian), slicer.util.arrayFromVolume(through.jacobian))


# ------------------------------------------------------------------------------------ failures
def _not_a_transform(p, s):
    return {"transform_node": p.fixed_segmentation}


def _under_its_transform(p, s):
    moving = node_from_volume(p.volumes.moving, "MR copy", s)
    transform = s.AddNewNodeByClass("vtkMRMLLinearTransformNode", "applied")
    moving.SetAndObserveTransformNodeID(transform.GetID())
    return {"warped_node": None, "moving_node": moving, "transform_node": transform, "warped_segmentation": None, "moving_segmentation": p.moving_segmentation}


BAD_INPUTS = {
    "no fixed volume": (lambda p, s: {"fixed_node": None}, "no fixed volume: select one"),
    "nothing to score": (lambda p, s: {"warped_node": None}, "nothing to score: select a warped volume, or a moving volume and the transform"),
    "moving without transform": (lambda p, s: {"warped_node": None, "moving_node": p.moving}, "nothing to score"),
    "warped and moving": (lambda p, s: {"moving_node": p.moving}, "both a warped and a moving volume"),
    "2D warped volume": (
        lambda p, s: {"warped_node": node_from_volume(Volume(np.zeros((1, 40, 50), np.float32)), "slice", s)},
        r"warped volume 'slice' is 2D \(50 x 40 x 1 voxels\)",
    ),
    "2D fixed volume": (
        lambda p, s: {"fixed_node": node_from_volume(Volume(np.zeros((30, 1, 50), np.float32)), "slice", s)},
        r"fixed volume 'slice' is 2D",
    ),
    "fixed as warped": (lambda p, s: {"warped_node": p.fixed}, "selected as both fixed and warped"),
    "not a transform": (_not_a_transform, "is a vtkMRMLSegmentationNode, not a transform node"),
    "moving under its transform": (_under_its_transform, "is under the transform 'applied' already"),
    "one-sided segmentation": (lambda p, s: {"fixed_segmentation": None}, "only the warped segmentation was given"),
    "moving segmentation with a warped volume": (
        lambda p, s: {"warped_segmentation": None, "moving_segmentation": p.moving_segmentation}, "a moving segmentation goes with a moving volume"
    ),
    "unknown model": (lambda p, s: {"model": "no_such_model"}, "no model named 'no_such_model'"),
    "registration model as critic": (lambda p, s: {"model": "adversarial_mrus"}, "'adversarial' model, not an AIR-net critic"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_clear_errors_and_change_nothing(pair, quality_model, case):
    scene = pair.scene
    make, message = BAD_INPUTS[case]
    args = {
        "fixed_node": pair.fixed, "warped_node": pair.moving, "fixed_segmentation": pair.fixed_segmentation,
        "warped_segmentation": pair.moving_segmentation, "model": MODEL, "scene": scene,
    }
    args.update(make(pair, scene))
    inputs = (pair.fixed, pair.moving, pair.fixed_segmentation, pair.moving_segmentation)
    before, states = node_ids(scene), [state(n) for n in inputs]
    with pytest.raises(ValueError, match=message):
        bridge.score_nodes(**args)
    assert node_ids(scene) == before
    for node, was in zip(inputs, states):
        assert_same_state(was, state(node))


@pytest.mark.parametrize("fail", ["cancel", "error"])
def test_cancel_or_error_leaves_the_scene_as_it_was(shared_data, shift, quality_model, monkeypatch, fail):
    """Stopped at the last step, or failing once the warped volume and Jacobian (and its colour table) exist."""
    pair = mrus_test_pair(slicer.vtkMRMLScene(), shared_data)  # a scene without the Jacobian colour table
    scene = pair.scene
    transform = transform_node_from_field(shift[0], "shift", scene)
    before = node_ids(scene)
    stages = []
    made = []

    def failing_table(*args):
        made.append(node_ids(scene))
        raise RuntimeError("disk full")

    monkeypatch.setattr(bridge, "_report_table", failing_table)
    with pytest.raises(Cancelled if fail == "cancel" else RuntimeError):
        bridge.score_nodes(
            pair.fixed, moving_node=pair.moving, transform_node=transform, model=quality_model,
            progress=lambda p: stages.append(p.stage), cancel=lambda: fail == "cancel" and stages[-1:] == ["scoring"],
        )
    if fail == "error":
        assert stages == ["loading the model", "exporting the transform", "warping the moving volume", "scoring", "outputs"]
        assert len(made[0]) == len(before) + 5  # warped volume and Jacobian, a display node each, the colour table
    assert node_ids(scene) == before
    assert scene.GetFirstNodeByName(logic.JACOBIAN_COLOR_NAME) is None


# ------------------------------------------------------------------------------------ save, reload
def test_scene_saves_as_mrb_and_reloads_with_the_table(shared_data, shift, quality_model, tmp_path):
    """Written with `vtkMRMLScene.WriteToMRB` and read back (test_modules.mrb_round_trip)."""
    pair = mrus_test_pair(slicer.vtkMRMLScene(), shared_data)
    scene = pair.scene
    transform = transform_node_from_field(shift[0], "shift", scene)
    outputs = bridge.score_nodes(pair.fixed, moving_node=pair.moving, transform_node=transform, model=quality_model)
    reloaded = mrb_round_trip(scene, tmp_path / "scored.mrb")

    table = reloaded.GetNodeByID(outputs.table.GetID())
    assert table is not None and table.GetName() == outputs.table.GetName()
    assert table_rows(table) == table_rows(outputs.table)
    assert_table_shows(table, outputs.report, outputs.report)
    for role, node in ((FIXED_VOLUME_ROLE, pair.fixed), (MOVING_VOLUME_ROLE, pair.moving), (bridge.TRANSFORM_ROLE, transform)):
        assert table.GetNodeReference(role).GetName() == node.GetName(), role
    jacobian = reloaded.GetNodeByID(outputs.jacobian.GetID())
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(jacobian), slicer.util.arrayFromVolume(outputs.jacobian))
    assert jacobian.GetDisplayNode().GetColorNode().GetName() == logic.JACOBIAN_COLOR_NAME
