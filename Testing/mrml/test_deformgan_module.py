"""The registration panel's logic with Deform-GAN (seed 002) on a real vtkMRMLScene.

AdversarialRegistrationLogic.register runs the method its model card names; for `deformgan_brain`
that is `register_nodes(..., "deformgan", {"model", "device"[, "finetune_steps"]})` with no quality
score (no shipped critic knows brain MR pairs). Data: the first pair of the held-back tumour study
(T1 deformed by a seeded known field, to T2), so Slicer's transform node can be scored against the
true field in millimetres.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
from test_modules import node_ids, table_row  # noqa: E402

from priorreg import known_deformations as kd  # noqa: E402
from priorreg.evaluate import TASKS  # noqa: E402
from priorreg.models import available_models  # noqa: E402
from priorreg.registration import register  # noqa: E402
from priorreg.slicer import field_from_transform_node, logic, node_from_volume, register_nodes, volume_from_node  # noqa: E402

MODEL = "deformgan_brain"


class Pair:
    """The nodes of one held-back known-deformation pair in a fresh scene."""

    def __init__(self, root):
        self.data = next(p for p in TASKS["brain_t1t2"][0](root, 1, 0) if p.group in kd.SPLIT["test"])
        self.volumes = v = self.data.load()
        self.scene = slicer.vtkMRMLScene()
        self.fixed = node_from_volume(v.fixed, "fixed T2", self.scene)
        self.moving = node_from_volume(v.moving, "moving T1, deformed", self.scene)


@pytest.fixture(scope="module")
def pair(shared_data):
    if MODEL not in available_models():
        pytest.fail(f"model {MODEL!r} not found: it ships in Resources/Models with its .json card")
    return Pair(shared_data)


def test_the_panel_offers_deform_gan_with_what_it_was_trained_on_and_no_critic():
    models = logic.registration_models()
    assert MODEL in models
    assert logic.matching_critic(models[MODEL]) is None  # the MR-TRUS critic knows nothing of brain MR
    summary = logic.model_summary(models[MODEL])
    assert summary.startswith("deformgan network trained on brain_multimodal") and "validation end-point error (mm)" in summary


def test_deform_gan_fine_tuned_in_the_scene_recovers_the_known_field_through_the_transform_node(pair):
    """The grid transform node Slicer holds, read back as a field, is the backend's, and nearer the true field than the start."""
    v = pair.volumes
    before = node_ids(pair.scene)
    moving_before = volume_from_node(pair.moving).array.copy()
    options = {"model": MODEL, "device": "cpu", "finetune_steps": 10}
    outputs = register_nodes(pair.fixed, pair.moving, "deformgan", options, scene=pair.scene)
    assert len(node_ids(pair.scene)) > len(before) and outputs.quality is None
    np.testing.assert_array_equal(volume_from_node(pair.moving).array, moving_before)  # inputs are never modified
    backend = register(v.fixed, v.moving, method="deformgan", **options)
    np.testing.assert_allclose(outputs.result.field.array, backend.field.array, atol=0.01)  # the MI affine repeats to micrometres
    through_slicer = field_from_transform_node(outputs.transform, pair.fixed)
    epe = kd.end_point_error(through_slicer, v.true_field, v.mask)["epe_mm"]
    start = kd.end_point_error(through_slicer.with_array(0 * through_slicer.array), v.true_field, v.mask)["epe_mm"]
    assert start > 5 and epe < 3, (start, epe)
    assert epe == pytest.approx(kd.end_point_error(backend.field, v.true_field, v.mask)["epe_mm"], abs=0.05)
    row = table_row(outputs.metrics)
    assert row["method"] == "deformgan+finetune" and row["folding_pct"] == 0
