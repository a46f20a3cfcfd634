"""The registration panel's logic with the symmetric network (seed 004) on a real vtkMRMLScene.

AdversarialRegistrationLogic.register runs the method its model card names; for
`symmetric_hippocampus` that is `register_nodes(..., "symmetric", {"model", "device"})` with no
quality score (no shipped critic knows brain MR pairs). Data: the first hippocampus pair of the
test subjects (subjects the shipped model never saw), labels 1 and 2 as two segments.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
from test_modules import check_outputs, node_ids, table_row  # noqa: E402

from priorreg import data  # noqa: E402
from priorreg.evaluate import pair_metrics  # noqa: E402
from priorreg.models import available_models  # noqa: E402
from priorreg.registration import register  # noqa: E402
from priorreg.slicer import logic, node_from_volume, register_nodes  # noqa: E402
from priorreg.slicer.segmentations import segmentation_from_labels  # noqa: E402
from priorreg.train_symmetric import DEFAULTS, subject_splits  # noqa: E402

MODEL = "symmetric_hippocampus"
OPTIONS = {"model": MODEL, "device": "cpu"}  # what AdversarialRegistrationLogic.register passes for this model


class Pair:
    """The nodes of one hippocampus pair in a fresh scene (the attribute names `check_outputs` reads)."""

    def __init__(self, root):
        subjects = subject_splits({**DEFAULTS["data"], "root": root})["test"]
        self.data = data.hippocampus_pairs(root, subjects=subjects)[0]
        self.volumes = v = self.data.load()
        self.scene = slicer.vtkMRMLScene()
        self.fixed = node_from_volume(v.fixed, "fixed T1", self.scene)
        self.moving = node_from_volume(v.moving, "moving T1", self.scene)
        self.fixed_segmentation = segmentation_from_labels(v.fixed_labels, "fixed hippocampus", self.scene)
        self.moving_segmentation = segmentation_from_labels(v.moving_labels, "moving hippocampus", self.scene)


@pytest.fixture(scope="module")
def pair(shared_data):
    if MODEL not in available_models():
        pytest.fail(f"model {MODEL!r} not found: it ships in Resources/Models with its .json card")
    return Pair(shared_data)


def test_the_panel_offers_registration_networks_and_scores_only_with_a_critic_of_the_same_data():
    models = logic.registration_models()
    assert {"adversarial_mrus", MODEL} <= set(models) and "airnet_mrus" not in models
    assert logic.matching_critic(models["adversarial_mrus"]) == "airnet_mrus"
    assert logic.matching_critic(models[MODEL]) is None  # the MR-TRUS critic knows nothing of brain MR
    assert logic.model_summary(models[MODEL]).startswith("symmetric network trained on hippocampus")


def test_symmetric_registration_makes_the_outputs_the_backend_would(pair):
    before = node_ids(pair.scene)
    outputs = register_nodes(
        pair.fixed, pair.moving, "symmetric", OPTIONS, pair.fixed_segmentation, pair.moving_segmentation, scene=pair.scene
    )
    check_outputs(pair, outputs, "symmetric")
    assert len(node_ids(pair.scene)) > len(before) and outputs.quality is None
    v = pair.volumes
    backend = register(v.fixed, v.moving, method="symmetric", **OPTIONS)
    np.testing.assert_allclose(outputs.result.field.array, backend.field.array, atol=1e-5)
    expected = pair_metrics(backend.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)
    unregistered = pair_metrics(backend.field.with_array(0 * backend.field.array), v.fixed, v.moving, v.fixed_labels, v.moving_labels)
    row = table_row(outputs.metrics)
    assert row["dice_mean"] == pytest.approx(expected["dice_mean"], abs=1e-6)
    assert row["dice_mean"] > unregistered["dice_mean"] + 0.1, (unregistered["dice_mean"], row["dice_mean"])
    assert row["folding_pct"] < 0.5


def test_segreg_is_offered_and_takes_the_segments_as_its_structures(pair):
    """The hippocampus segmenter's registration through the panel's logic: from the images alone, and with the
    scene's segments (anterior, posterior: the card's order) in place of its own outlines."""
    segreg = "segreg_hippocampus"
    models = logic.registration_models()
    if segreg not in models:
        pytest.fail(f"model {segreg!r} not found: it ships in Resources/Models with its .json card")
    summary = logic.model_summary(models[segreg])
    assert summary.startswith("segreg networks (2, averaged) trained on hippocampus") and "validation segmentation Dice 0.87" in summary
    assert logic.matching_critic(models[segreg]) is None
    v, options = pair.volumes, {"model": segreg, "device": "cpu"}
    predicted = register_nodes(pair.fixed, pair.moving, "segreg", options, scene=pair.scene)
    np.testing.assert_allclose(predicted.result.field.array, register(v.fixed, v.moving, method="segreg", **options).field.array, atol=1e-4)
    given = register_nodes(pair.fixed, pair.moving, "segreg", options, pair.fixed_segmentation, pair.moving_segmentation, scene=pair.scene)
    expert = register(v.fixed, v.moving, method="segreg", fixed_labels=v.fixed_labels, moving_labels=v.moving_labels, **options)
    np.testing.assert_allclose(given.result.field.array, expert.field.array, atol=1e-4)
    assert np.abs(given.result.field.array - predicted.result.field.array).max() > 0.5  # the segments did drive it
    assert table_row(given.metrics)["dice_mean"] > 0.85  # the experts' outlines aligned
