"""The quality report: agreement measures, calibration, and the shipped critic on real MR-US pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from priorreg import data, quality
from priorreg.methods.adversarial import ModelFrame
from priorreg.reference import cached_reference, reference_field
from priorreg.spatial import Grid, affine_to_field, field_volume, resample
from priorreg.volume import Volume


def test_agreement_of_perfect_and_random_scores():
    tre = np.linspace(0, 10, 50)
    perfect = quality.agreement(-tre, tre)
    assert perfect["spearman"] == pytest.approx(-1.0) and perfect["auroc"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    chance = quality.agreement(rng.normal(size=2000), rng.uniform(0, 10, 2000))
    assert abs(chance["spearman"]) < 0.1 and abs(chance["auroc"] - 0.5) < 0.05


def test_calibration_is_monotone_and_its_interval_holds_80_percent():
    rng = np.random.default_rng(1)
    tre = rng.uniform(0, 12, 400)
    scores = -tre + rng.normal(0, 1.0, 400)
    cal = quality.fit_calibration(scores, tre)
    assert np.all(np.diff(cal["tre_mm"]) <= 1e-9)
    est = np.array([quality.estimate_tre(cal, s) for s in scores])
    inside = (tre >= est[:, 1]) & (tre <= est[:, 2])
    assert 0.7 < inside.mean() < 0.9
    assert quality.verdict(3.0) == "good" and quality.verdict(5.0) == "check" and quality.verdict(9.0) == "failed"


def _ellipsoid_glands(angles_deg, shift_mm):
    """A fixed gland (an ellipsoid, 40 x 30 x 24 mm, soft edge) on a 2 mm grid and the same gland moved by a
    rotation about its centre and a shift; and the RMS motion over the fixed gland that moved it."""
    grid = Volume(np.zeros((1, 36, 48, 36), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    points = Grid.of(grid).physical_points()
    centre = points.reshape(-1, 3).mean(0)
    rotation = quality.air.rotation_matrix(torch.tensor([angles_deg], dtype=torch.float64))[0].numpy()

    def gland(r, t):
        y = (points - centre - t) @ r  # r^T (x - c - t): the moved gland at x
        inside = (y[..., 0] / 20) ** 2 + (y[..., 1] / 15) ** 2 + (y[..., 2] / 12) ** 2
        return grid.with_array((1 / (1 + np.exp((inside - 1) * 12)))[None].astype(np.float32))

    fixed, moved = gland(np.eye(3), np.zeros(3)), gland(rotation, np.asarray(shift_mm, float))
    x = points[fixed.array[0] >= 0.5]
    motion = (x - centre) @ rotation.T + centre + np.asarray(shift_mm, float) - x
    return fixed, moved, float(np.sqrt(np.square(motion).sum(1).mean()))


@pytest.mark.parametrize("angles, shift", [((0, 0, 0), (0, 0, 0)), ((0, 0, 20), (0, 0, 0)), ((8, -5, 12), (3, -2, 1.5)), ((15, 10, -20), (5, 5, -5))])
def test_gland_misfit_recovers_a_known_rigid_motion(angles, shift):
    """Within 0.3 mm of the true RMS motion over the gland, including a pure rotation about its centre,
    which moves no centroid."""
    fixed, moved, truth = _ellipsoid_glands(angles, shift)
    assert quality.gland_misfit(fixed, moved) == pytest.approx(truth, abs=0.3)
    empty = moved.with_array(np.zeros_like(moved.array))
    assert np.isnan(quality.gland_misfit(fixed, empty))


def test_gland_calibration_weighs_the_better_evidence_more():
    """Synthetic validation samples where the misfit tracks TRE more closely than the critic's estimate: the
    blend leans to the misfit, is increasing in the evidence, and estimates TRE better than the critic alone."""
    rng = np.random.default_rng(2)
    tre = rng.uniform(0, 12, 600)
    critic, misfit = tre + rng.normal(0, 3.0, 600), tre + 1.0 + rng.normal(0, 1.0, 600)
    cal = quality.fit_gland_calibration(critic, misfit, tre)
    assert cal["weight"] >= 0.6 and np.all(np.diff(cal["tre_mm"]) >= -1e-9)
    est = np.array([quality.gland_estimate(cal, c, m)[0] for c, m in zip(critic, misfit)])
    assert np.mean(np.abs(est - tre)) < 0.6 * np.mean(np.abs(critic - tre))
    worse = quality.fit_gland_calibration(critic, rng.uniform(0, 12, 600), tre)  # a misfit that says nothing
    assert worse["weight"] <= 0.2


@pytest.fixture(scope="module")
def scorer():
    return quality.QualityModel("airnet_mrus", "adversarial_mrus", "cpu")


@pytest.fixture(scope="module")
def held_out(shared_data, scorer):
    """A test-split pair (never seen in training or calibration) aligned by its reference."""
    pair = data.split_by_patient(data.mrus_pairs(shared_data))["test"][0]
    v = pair.load()
    frame, init = scorer.airnet.frame, scorer.airnet.card["preprocessing"]["init"]
    ref = reference_field(v.fixed, v.moving, cached_reference(pair, frame, init), frame, init)
    return v, ref


def _rigid(v, ref, degrees: float, shift_mm: float) -> Volume:
    matrix = quality.air.transform_matrix(torch.tensor([[0.0, 0.0, degrees, shift_mm, shift_mm, 0.0]]), "rigid")[0]
    return quality.perturbed_field(v.fixed, v.moving, ref, matrix, ModelFrame(), "centres")


def test_the_critic_ranks_an_aligned_pair_above_misaligned_ones(held_out, scorer):
    v, ref = held_out
    aligned = scorer.d_score(v.fixed, resample(v.moving, v.fixed, ref, mode="linear"))
    small = scorer.d_score(v.fixed, resample(v.moving, v.fixed, _rigid(v, ref, 5.0, 1.5), mode="linear"))
    large = scorer.d_score(v.fixed, resample(v.moving, v.fixed, _rigid(v, ref, 20.0, 5.0), mode="linear"))
    assert aligned > small > large
    report = quality.quality_report(v.fixed, resample(v.moving, v.fixed, ref, mode="linear"), model=scorer)
    bad = quality.quality_report(v.fixed, resample(v.moving, v.fixed, _rigid(v, ref, 20.0, 5.0), mode="linear"), model=scorer)
    assert report["tre_estimate_mm"] < bad["tre_estimate_mm"]
    assert report["critic_tre_estimate_mm"] < bad["critic_tre_estimate_mm"]
    assert report["gland_misfit_mm"] + 2 < bad["gland_misfit_mm"]  # 20 degrees and 5 mm move the gland by more
    assert bad["verdict"] != "good"


def test_trivial_pairs_never_score_as_good(held_out, scorer):
    """An empty or constant warped image, the fixed image pasted as warped, swapped modalities."""
    v, ref = held_out
    aligned = resample(v.moving, v.fixed, ref, mode="linear")
    good_score = scorer.d_score(v.fixed, aligned)
    cases = {
        "empty": (v.fixed, aligned.with_array(np.zeros_like(aligned.array))),
        "constant": (v.fixed, aligned.with_array(np.full_like(aligned.array, 90))),
        "fixed_as_warped": (v.fixed, v.fixed),
        "swapped": (aligned, v.fixed),
    }
    for name, (fixed, warped) in cases.items():
        report = quality.quality_report(fixed, warped, model=scorer)
        assert report["verdict"] != "good", name
        if name in ("fixed_as_warped", "swapped"):  # no image check catches these: the critic itself must
            assert report["d_score"] < good_score, name
            assert quality.verdict(report["critic_tre_estimate_mm"], scorer.thresholds) != "good", name
    assert "empty" in quality.quality_report(*cases["empty"], model=scorer)["reasons"][0]
    flat = quality.quality_report(v.fixed.with_array(np.full_like(v.fixed.array, 7)), aligned, model=scorer)  # a blank fixed image
    assert flat["verdict"] != "good" and any("the gland check could not run" in r for r in flat["reasons"]), flat


def test_report_with_a_field_its_inverse_and_labels(held_out, scorer):
    v, _ = held_out
    grid = Grid.of(v.fixed)
    shift = torch.tensor([[1.0, 0, 0, 3.0], [0, 1.0, 0, -2.0], [0, 0, 1.0, 1.0]])
    field = field_volume(affine_to_field(shift, grid), grid)
    inverse_matrix = torch.cat([torch.eye(3), -shift[:, 3:]], 1)
    inverse = field_volume(affine_to_field(inverse_matrix, Grid.of(v.moving)), Grid.of(v.moving))
    warped = resample(v.moving, v.fixed, field, mode="linear")
    warped_labels = resample(v.moving_labels, v.fixed, field)
    report = quality.quality_report(v.fixed, warped, field, inverse, v.fixed_labels, warped_labels, model=scorer)
    assert report["folding_pct"] == 0 and report["detj_mean"] == pytest.approx(1.0, abs=1e-6)
    assert report["inverse_consistency_mm"] < 1e-6
    assert 0.0 <= report["plausibility"] <= 1.0
    assert 0.0 <= report["dice_mean"] <= 1.0
    with pytest.raises(ValueError, match="fixed image's grid"):
        quality.quality_report(v.fixed, warped, inverse, model=scorer)


def test_a_gross_misalignment_the_critic_misses_is_caught_by_the_glands(shared_data):
    """The critic learned "aligned" within +-25 degrees and +-5 mm: it calls a validation pair's centred
    fields of view (12 mm TRE) good. The glands the segmenters find 10 mm apart fail it, and the
    reference alignment stays good."""
    pair = next(p for p in data.split_by_patient(data.mrus_pairs(shared_data))["val"] if p.id == "obs000")
    rows = {r["alignment"]: r for r in quality.gross_misalignments([pair], quality.QualityModel(plausibility=None))}
    centred = rows["centres"]
    assert centred["tre_mm"] > 10 and centred["critic_verdict"] == "good"  # the critic alone
    assert centred["verdict"] == "failed" and centred["gland_offset_mm"] > 7
    assert rows["identity"]["tre_mm"] > 15 and rows["identity"]["verdict"] == "failed"
    assert rows["reference"]["verdict"] == "good" and rows["reference"]["gland_offset_mm"] < 3
