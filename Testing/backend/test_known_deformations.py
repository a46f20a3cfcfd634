"""Known deformations (seed 002's evaluation): the field is physical and seeded, the pair's answer is the field.

The pair is fixed(x) = T2(x + u(x)), moving = T1, so the true registration field is `u` itself;
`evaluate_task("brain_t1t2", ...)` must then score a field by its distance to `u` in mm.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from priorreg import known_deformations as kd
from priorreg import losses
from priorreg.cli import main
from priorreg.evaluate import evaluate_task, known_field_metrics
from priorreg.jacobian import jacobian_stats
from priorreg.methods.common import normalise_intensity
from priorreg.spatial import Grid, affine_to_field, field_to_sitk, resample, warp
from priorreg.volume import Volume

from .geometry import oblique

ZERO = {"rotation_deg": 0.0, "scaling": 0.0, "shift_mm": 0.0, "elastic_mm": 0.0}


def oblique_grid(shape=(15, 21, 19)) -> Grid:
    """Odd sizes, so the grid centre is a voxel centre."""
    return Grid.of(oblique([12, -25, 40], [1.3, 0.7, 2.9], [-40.0, 15.0, 60.0], shape))


def norms(u: Volume) -> np.ndarray:
    return np.linalg.norm(u.array.astype(np.float64), axis=0)


# ---------------------------------------------------------------------------- the field alone
def test_field_is_reproducible_per_seed_and_differs_between_seeds():
    grid = oblique_grid()
    a, b, c = (kd.random_deformation(grid, seed=s) for s in (7, 7, 8))
    assert a.array.shape == (3, *grid.shape) and a.array.dtype == np.float32 and Grid.of(a).matches(grid)
    np.testing.assert_array_equal(a.array, b.array)
    assert np.abs(a.array - c.array).max() > 1.0
    # Within the documented bounds: |(RS - I)(x - c)| + |t| + elastic, with |RS - I| <= 0.1 + 2 sin(5 deg).
    radius = np.linalg.norm(grid.physical_points() - grid.center, axis=-1)
    bound = (0.1 + 2 * np.sin(np.deg2rad(5))) * radius + 10 + 5
    assert (norms(a) <= bound + 1e-3).all() and norms(a).mean() > 1.0


def test_zero_magnitudes_give_exactly_zero():
    u = kd.random_deformation(oblique_grid(), seed=3, **ZERO)
    assert u.array.shape == (3, 15, 21, 19) and not u.array.any()


def test_a_pure_shift_is_the_same_physical_vector_everywhere():
    grid = oblique_grid()
    t = np.array([3.0, -1.5, 2.0])
    np.testing.assert_allclose(kd.affine_displacement(grid, np.eye(3), t)[0].numpy(), np.broadcast_to(t[:, None, None, None], (3, *grid.shape)), atol=1e-12)

    u = kd.random_deformation(grid, seed=5, **{**ZERO, "shift_mm": 10.0})
    shift = u.array[:, 0, 0, 0].astype(np.float64)
    assert 0 < np.linalg.norm(shift) <= 10.0
    np.testing.assert_allclose(u.array, np.broadcast_to(shift[:, None, None, None], u.array.shape), atol=1e-5)
    # Physical: warping a ramp f(p) = a . p through u gives f(p + t), on this oblique, anisotropic grid.
    a = np.array([0.3, -0.2, 0.5])
    pts = grid.physical_points()
    ramp = Volume((pts @ a).astype(np.float32), grid.spacing, grid.origin, grid.direction)
    warped = resample(ramp, grid, u).array
    index = (pts + shift - grid.origin) @ np.linalg.inv(grid.direction * grid.spacing).T  # continuous (i, j, k)
    inside = ((index >= 0) & (index <= np.array(grid.shape[::-1]) - 1)).all(-1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(warped[inside], ((pts + shift) @ a)[inside], atol=1e-3)


def test_a_rotation_turns_about_the_grid_centre():
    grid = oblique_grid()
    u = kd.random_deformation(grid, seed=11, **{**ZERO, "rotation_deg": 10.0})
    centre = tuple(n // 2 for n in grid.shape)
    np.testing.assert_allclose(u.array[(slice(None), *centre)], 0, atol=1e-5)
    rel = grid.physical_points() - grid.center
    moved = rel + np.moveaxis(u.array.astype(np.float64), 0, -1)
    np.testing.assert_allclose(np.linalg.norm(moved, axis=-1), np.linalg.norm(rel, axis=-1), atol=1e-4)
    cos = (moved * rel).sum(-1) / np.maximum(np.linalg.norm(rel, axis=-1) ** 2, 1e-9)
    angle = np.degrees(np.arccos(np.clip(cos[np.linalg.norm(rel, axis=-1) > 5], -1, 1)))
    assert 0.5 < angle.max() <= 10.0 + 1e-3
    # The same map as the repository's affine field about the centre (which adds and removes c).
    matrix, shift = kd.random_affine(np.random.default_rng(11), 10.0, 0.0, 0.0)
    theirs = affine_to_field(np.c_[matrix, shift], grid, center=grid.center)[0].numpy()
    np.testing.assert_allclose(u.array, theirs, atol=1e-4)


def test_elastic_part_has_the_documented_peak_and_does_not_fold():
    grid = oblique_grid((25, 31, 29))
    u = kd.random_deformation(grid, seed=2, **{**ZERO, "elastic_mm": 5.0})
    assert norms(u).max() == pytest.approx(5.0, rel=1e-5)
    assert norms(u).mean() > 1.0
    assert jacobian_stats(u)["folding_pct"] == 0.0


def test_working_grid_coarsens_the_finest_axes_and_keeps_the_field_of_view():
    tumour = Grid.of(oblique([0, 15, 0], [0.43, 0.43, 6.5], [-106.0, -186.0, -43.0], (22, 512, 512), array=np.zeros((22, 512, 512), np.uint8)))
    coarse = kd.working_grid(tumour, kd.EVAL_MAX_VOXELS)
    assert 0.8 * kd.EVAL_MAX_VOXELS < np.prod(coarse.shape) <= kd.EVAL_MAX_VOXELS
    assert coarse.shape[0] == 22 and coarse.spacing[2] == pytest.approx(6.5)  # the 6.5 mm slices stay
    assert coarse.spacing[0] == pytest.approx(coarse.spacing[1], rel=0.01) and coarse.spacing[0] > 0.8
    def last_voxel(g):
        return g.index_to_physical @ np.append(np.array(g.shape[::-1]) - 1.0, 1)

    np.testing.assert_allclose(last_voxel(coarse), last_voxel(tumour), atol=1e-6)
    np.testing.assert_allclose(coarse.origin, tumour.origin)
    assert kd.working_grid(tumour, None) is tumour and kd.working_grid(tumour, 10**8) is tumour


def test_end_point_error_is_in_mm_over_the_mask():
    grid = oblique_grid()
    zero = Volume(np.zeros((3, *grid.shape), np.float32), grid.spacing, grid.origin, grid.direction)
    shifted = zero.with_array(np.broadcast_to(np.array([3.0, 0, 4.0], np.float32)[:, None, None, None], zero.array.shape).copy())
    mask = np.zeros(grid.shape, bool)
    mask[:5] = True
    assert kd.end_point_error(shifted, zero, mask) == {"epe_mm": pytest.approx(5.0), "epe_median_mm": pytest.approx(5.0)}
    half = shifted.with_array(np.where(mask[None], shifted.array, 0))
    assert kd.end_point_error(half, zero)["epe_mm"] == pytest.approx(5.0 * mask.mean())


# --------------------------------------------------------------------------- pairs on real data
@pytest.fixture(scope="module")
def stroke_pair(shared_data):
    """The first pair of the task as `evaluate_task` builds it (the stroke T1 -> T2, seed 0)."""
    pair = kd.known_deformation_pairs(shared_data, n=1, max_voxels=kd.EVAL_MAX_VOXELS)[0]
    return pair, pair.load()


def test_pairs_cover_every_set_and_both_fixed_modalities(shared_data):
    pairs = kd.known_deformation_pairs(shared_data, n=2, seed=0)
    ids = [p.id for p in pairs]
    assert len(ids) == len(set(ids)) == 12
    assert ids[:3] == ["stroke_T1_to_T2_0", "tumor_Study1_T1pre_to_T2_0", "tumor_Study3_T1pre_to_T2_0"]
    assert "stroke_T1_to_FLAIR_1" in ids
    by_id = {p.id: p for p in pairs}
    assert by_id["stroke_T1_to_T2_0"].deformation_seed == by_id["stroke_T1_to_FLAIR_0"].deformation_seed
    seeds = {p.deformation_seed for p in pairs}
    assert len(seeds) == 6  # 3 sets x 2 deformations
    assert {p.deformation_seed for p in kd.known_deformation_pairs(shared_data, n=2, seed=1)}.isdisjoint(seeds)
    assert all(p.fixed.is_file() and p.moving.is_file() and p.group in p.id for p in pairs)


def test_the_true_field_registers_the_pair(stroke_pair):
    pair, v = stroke_pair
    grid = Grid.of(v.fixed)
    assert np.prod(grid.shape) <= kd.EVAL_MAX_VOXELS and Grid.of(v.true_field).matches(grid) and Grid.of(v.moving).matches(grid)
    assert v.mask.array.dtype == np.uint8 and 0.2 < v.mask.array.mean() < 0.7
    assert jacobian_stats(v.true_field)["folding_pct"] == 0.0
    # The fixed image is the reference modality resampled through u, on the same grid as T1.
    reference = kd.on_grid(Volume.read(pair.fixed), grid)
    np.testing.assert_array_equal(v.fixed.array, resample(reference, grid, v.true_field).array)
    # The ground-truth warp, by ITK's own displacement-field transform (an independent implementation).
    transform = sitk.DisplacementFieldTransform(field_to_sitk(v.true_field))
    theirs = sitk.GetArrayFromImage(sitk.Resample(v.moving.to_sitk(), v.fixed.to_sitk(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    brain = v.mask.array.astype(bool)
    assert np.abs(theirs[brain] - v.true_warped.array[brain]).max() < 1e-3 * v.moving.array.max()
    # The warped T1 outlines the deformed head where the undeformed T1 does not.
    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    head = kd.foreground(v.fixed).array.astype(bool)
    warped_head = kd.foreground(v.true_warped).array.astype(bool)
    moving_head = kd.foreground(v.moving).array.astype(bool)
    assert dice(head, warped_head) > 0.95 and dice(head, warped_head) > dice(head, moving_head) + 0.03


def test_local_gradient_loss_falls_towards_the_true_field(stroke_pair):
    """T1 -> T2 flips the sign of most brain edges: the similarity must still be lowest at the answer.

    The paper's signed distance rose from identity to the true field on this pair (0.244 -> 0.289),
    so `register_iterative` with it went from 5.4 mm EPE to 12.9 mm.
    """
    _, v = stroke_pair
    grid = Grid.of(v.fixed)
    fixed, moving = (torch.as_tensor(normalise_intensity(x.array))[None, None] for x in (v.fixed, v.moving))
    u = torch.as_tensor(v.true_field.array)[None]
    loss = {s: losses.local_gradient(fixed, warp(moving, s * u, grid, grid), grid).item() for s in (0.0, 0.5, 1.0, 1.5)}
    assert loss[1.0] < loss[0.5] - 0.02 < loss[0.0] - 0.04, loss
    assert loss[1.0] < loss[1.5] - 0.02, loss


def test_mutual_information_falls_towards_the_true_field(stroke_pair):
    """The multimodal similarity of the per-pair optimisers: highest at the answer of this T1 -> T2 pair, and more so than
    halfway or past it."""
    _, v = stroke_pair
    grid = Grid.of(v.fixed)
    fixed, moving = (torch.as_tensor(normalise_intensity(x.array))[None, None] for x in (v.fixed, v.moving))
    u = torch.as_tensor(v.true_field.array)[None]
    loss = {s: losses.mutual_information(fixed, warp(moving, s * u, grid, grid)).item() for s in (0.0, 0.5, 1.0, 1.5)}
    assert loss[1.0] < loss[0.5] - 0.05 < loss[0.0] - 0.1, loss
    assert loss[1.0] < loss[1.5] - 0.05, loss


def independent_mask(pair, v) -> np.ndarray:
    """T2 > 10% of its 99th percentile, looked up at x + u(x) by nearest voxel, in plain numpy."""
    grid = Grid.of(v.fixed)
    t2 = kd.on_grid(Volume.read(pair.mask_source), grid).array
    inside_head = t2 > 0.1 * np.percentile(t2, 99)
    points = grid.physical_points() + np.moveaxis(v.true_field.array.astype(np.float64), 0, -1)
    index = (points - grid.origin) @ np.linalg.inv(grid.direction * grid.spacing).T
    nearest = np.rint(index).astype(int)
    valid = ((nearest >= 0) & (nearest < np.array(grid.shape[::-1]))).all(-1)
    i, j, k = (np.clip(nearest[..., a], 0, n - 1) for a, n in zip(range(3), grid.shape[::-1]))
    return valid & inside_head[k, j, i]


def test_identity_scores_the_mean_true_displacement(stroke_pair, shared_data):
    pair, v = stroke_pair
    report = evaluate_task("brain_t1t2", "identity", shared_data, n_pairs=1)
    (row,) = report["pairs"]
    assert row["id"] == "stroke_T1_to_T2_0" and row["fixed"] == "T2.nii.gz" and row["moving"] == "T1.nii.gz"
    mask = independent_mask(pair, v)
    assert abs(mask.mean() - v.mask.array.mean()) < 1e-3
    expected = norms(v.true_field)[mask].mean()
    assert expected > 2.0
    assert row["epe_mm"] == pytest.approx(expected, rel=1e-3)
    assert row["epe_median_mm"] == pytest.approx(np.median(norms(v.true_field)[mask]), rel=1e-2)
    assert 0.05 < row["rmse"] < 0.5 and row["folding_pct"] == 0.0 and "seconds" in row
    s = report["summary"]
    assert s["n_pairs"] == 1 and s["epe_mm"] == row["epe_mm"] and s["rmse"] == row["rmse"] and "epe_median_mm" in s


def test_the_true_field_scores_zero_and_an_offset_scores_its_length(stroke_pair, shared_data):
    _, v = stroke_pair

    def truth(fixed, moving):
        assert Grid.of(fixed).matches(v.true_field) and np.array_equal(fixed.array, v.fixed.array)
        return v.true_field

    report = evaluate_task("brain_t1t2", "truth", shared_data, n_pairs=1, registrar=truth)
    s = report["summary"]
    assert s["epe_mm"] == 0.0 and s["rmse"] < 1e-6 and s["folding_pct"] == 0.0
    off = v.true_field.with_array(v.true_field.array + np.array([0.6, 0.0, -0.8], np.float32)[:, None, None, None])
    scored = known_field_metrics(off, v.true_field, v.moving, v.mask)
    assert scored["epe_mm"] == pytest.approx(1.0, abs=1e-5) and scored["rmse"] > 1e-3


def test_a_validation_split_is_rejected_and_the_cli_runs_the_task(shared_data, tmp_path):
    with pytest.raises(ValueError, match="split"):  # three sets: train and test only (known_deformations.SPLIT)
        evaluate_task("brain_t1t2", "identity", shared_data, n_pairs=1, split="val")
    out = tmp_path / "report.json"
    assert main(["--data-root", str(shared_data), "evaluate", "--task", "brain_t1t2", "--method", "centres", "--pairs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "brain_t1t2" and report["summary"]["n_pairs"] == 1
    assert report["summary"]["epe_mm"] > 2.0  # one shared grid: centring moves nothing
    assert main(["--data-root", str(shared_data), "evaluate", "--task", "brain_t1t2", "--split", "val", "--json", str(out)]) == 2


def test_the_undeformed_control_has_a_zero_true_field_and_scores_motion_as_error(shared_data):
    """`brain_t1t2_undeformed`: the held-back pairs with no deformation; the identity scores 0, a shift its length."""
    report = evaluate_task("brain_t1t2_undeformed", "identity", shared_data, split="test")
    assert [r["id"] for r in report["pairs"]] == [f"{kd.SPLIT['test'][0]}_T1pre_to_{m}_0" for m in ("T2", "FLAIR")]
    assert all(r["epe_mm"] == 0.0 for r in report["pairs"])

    def shifted(fixed, moving):
        return Volume(np.broadcast_to(np.array([0.0, 1.2, 0.0], np.float32)[:, None, None, None], (3, *fixed.shape)).copy(),
                      fixed.spacing, fixed.origin, fixed.direction)  # fmt: skip

    moved = evaluate_task("brain_t1t2_undeformed", "shift", shared_data, n_pairs=1, split="test", registrar=shifted)
    assert moved["pairs"][0]["epe_mm"] == pytest.approx(1.2, abs=1e-5)
