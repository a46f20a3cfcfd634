"""The `priorreg` command line on real data: outputs, figures, and bad input that writes nothing."""

import json

import numpy as np
import pytest
import torch

from priorreg import Volume, metrics
from priorreg.cli import main
from priorreg.spatial import Grid, affine_to_field, field_volume, resample, write_field


@pytest.fixture
def hippocampus_pair(shared_data):
    root = shared_data / "hippocampus"
    return {
        "fixed": root / "images" / "hippocampus_004.nii.gz",
        "moving": root / "images" / "hippocampus_006.nii.gz",
        "fixed_labels": root / "labels" / "hippocampus_004.nii.gz",
        "moving_labels": root / "labels" / "hippocampus_006.nii.gz",
    }


def _translation_field(reference: Volume, t) -> Volume:
    grid = Grid.of(reference)
    return field_volume(affine_to_field(torch.as_tensor(np.c_[np.eye(3), t]), grid), grid)


def test_warp_writes_the_resampled_labels(tmp_path, hippocampus_pair):
    fixed = Volume.read(hippocampus_pair["fixed"])
    write_field(_translation_field(fixed, [2.0, -1.0, 0.5]), tmp_path / "u.nii.gz")
    out = tmp_path / "warped.nii.gz"
    args = ["warp", "--moving", str(hippocampus_pair["moving_labels"]), "--field", str(tmp_path / "u.nii.gz")]
    assert main(args + ["--reference", str(hippocampus_pair["fixed"]), "--labels", "--out", str(out)]) == 0
    got = Volume.read(out)
    expected = resample(Volume.read(hippocampus_pair["moving_labels"]), fixed, _translation_field(fixed, [2.0, -1.0, 0.5]))
    assert got.array.dtype == np.uint8 and Grid.of(got).matches(fixed)
    np.testing.assert_array_equal(got.array, expected.array)


def test_evaluate_field_reports_dice_of_the_warped_labels(tmp_path, hippocampus_pair):
    fixed = Volume.read(hippocampus_pair["fixed"])
    write_field(_translation_field(fixed, [0.0, 0.0, 0.0]), tmp_path / "zero.nii.gz")
    report = tmp_path / "m.json"
    assert main([
        "evaluate-field", "--fixed", str(hippocampus_pair["fixed"]), "--moving", str(hippocampus_pair["moving"]),
        "--field", str(tmp_path / "zero.nii.gz"), "--fixed-labels", str(hippocampus_pair["fixed_labels"]),
        "--moving-labels", str(hippocampus_pair["moving_labels"]), "--intensity", "--json", str(report),
    ]) == 0
    row = json.loads(report.read_text())["pairs"][0]
    direct = metrics.dice(Volume.read(hippocampus_pair["fixed_labels"]),
                          resample(Volume.read(hippocampus_pair["moving_labels"]), fixed))
    assert row["dice_mean"] == pytest.approx(np.mean(list(direct.values())), abs=1e-9)
    assert row["folding_pct"] == 0 and row["detj_mean"] == pytest.approx(1.0) and 0 < row["ssim"] < 1


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, hippocampus_pair, capsys):
    fixed = Volume.read(hippocampus_pair["fixed"])
    good_field = tmp_path / "u.nii.gz"
    write_field(_translation_field(fixed, [1.0, 0, 0]), good_field)
    out = tmp_path / "out.nii.gz"
    cases = {
        "missing.nii.gz: file not found": ["--moving", str(tmp_path / "missing.nii.gz"), "--field", str(good_field)],
        "needs 3 components": ["--moving", str(hippocampus_pair["moving"]), "--field", str(hippocampus_pair["fixed"])],
        "differs from the reference": ["--moving", str(hippocampus_pair["moving"]), "--field", str(good_field),
                                       "--reference", str(hippocampus_pair["moving"])],
    }
    for message, args in cases.items():
        assert main(["warp", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.nii.gz"]


def test_register_improves_a_real_hippocampus_pair(tmp_path, hippocampus_pair):
    """The main job's code path: image-only registration, outputs written, labels only for scoring."""
    out = tmp_path / "run"
    assert main([
        "register", "--fixed", str(hippocampus_pair["fixed"]), "--moving", str(hippocampus_pair["moving"]),
        "--fixed-labels", str(hippocampus_pair["fixed_labels"]), "--moving-labels", str(hippocampus_pair["moving_labels"]),
        "--device", "cpu", "--out", str(out),
    ]) == 0
    report = json.loads((out / "metrics.json").read_text())
    before, after = report["identity"]["dice_mean"], report["registered"]["dice_mean"]
    assert after > before + 0.1, (before, after)  # 0.62 -> 0.83 when written
    assert report["registered"]["folding_pct"] < 0.1
    fixed = Volume.read(hippocampus_pair["fixed"])
    for name in ("field.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz"):
        assert Grid.of(Volume.read(out / name)).matches(fixed), name
    detj = Volume.read(out / "jacobian.nii.gz").array
    assert detj.min() > 0  # diffeomorphic: no folding anywhere
    assert detj.mean() == pytest.approx(report["registered"]["detj_mean"], rel=1e-4)


def test_identity_figures_of_the_mrus_set_are_the_ones_in_the_readme(shared_data, repo_root):
    """The README records the starting point later methods must beat; it must be what the command prints."""
    from priorreg.evaluate import evaluate_task

    summary = evaluate_task("mrus_prostate", "identity", shared_data)["summary"]
    assert summary["n_pairs"] == 80
    readme = (repo_root / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| identity (headers)"))
    assert f"{summary['tre_median_mm']:.1f}" in row and f"{summary['dice_mean']:.2f}" in row


def test_register_with_the_shipped_network_on_a_held_out_mrus_pair(tmp_path, shared_data):
    """`--method adversarial`: images only, then the same with fine-tuning on the gland (channel 0)."""
    from priorreg.data import mrus_pairs, split_by_patient

    pair = split_by_patient(mrus_pairs(shared_data))["test"][1]
    files = ["--fixed", str(pair.fixed), "--moving", str(pair.moving),
             "--fixed-labels", str(pair.fixed_labels), "--moving-labels", str(pair.moving_labels)]  # fmt: skip
    reports = []
    for extra, out in (([], tmp_path / "plain"), (["--finetune-steps", "20", "--label-channels", "0"], tmp_path / "tuned")):
        assert main(["register", *files, "--method", "adversarial", "--device", "cpu", *extra, "--out", str(out)]) == 0
        reports.append(json.loads((out / "metrics.json").read_text()))
        fixed = Volume.read(pair.fixed)
        for name in ("field.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "warped_labels.nii.gz"):
            assert Grid.of(Volume.read(out / name)).matches(fixed), name
    plain, tuned = (r["registered"] for r in reports)
    assert plain["dice_mean"] > reports[0]["identity"]["dice_mean"] + 0.2  # headers' frames are unrelated
    assert tuned["dice_mean"] > plain["dice_mean"]
    assert plain["folding_pct"] < 0.5 and tuned["folding_pct"] < 0.5


def test_score_reports_a_verdict_for_any_tools_output(tmp_path, shared_data):
    """`priorreg score` on a registration written by `priorreg register` (any tool's files would do)."""
    from priorreg.data import mrus_pairs, split_by_patient

    pair = split_by_patient(mrus_pairs(shared_data))["test"][2]
    out = tmp_path / "reg"
    assert main(["register", "--fixed", str(pair.fixed), "--moving", str(pair.moving), "--method", "airnet",
                 "--passes", "2", "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert Grid.of(Volume.read(out / "field.nii.gz")).matches(Volume.read(pair.fixed))
    args = ["score", "--fixed", str(pair.fixed), "--warped", str(out / "warped.nii.gz"), "--field", str(out / "field.nii.gz")]
    assert main([*args, "--json", str(tmp_path / "q.json")]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["verdict"] in ("good", "check", "failed")
    low, high = report["tre_interval_mm"]
    assert 0 <= low <= report["tre_estimate_mm"] <= high
    assert report["folding_pct"] == 0  # an affine never folds
    assert main([*args[:-2], "--field", str(pair.fixed), "--json", str(tmp_path / "bad.json")]) == 2  # not a field
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: --device cuda is honoured")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, shared_data, capsys):
    for method in ("iterative", "adversarial"):
        out = tmp_path / method
        assert main(["--data-root", str(shared_data), "register", "--sample", "mrus", "--method", method, "--device", "cuda", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "no CUDA GPU is available" in err and "Traceback" not in err and not out.exists()


def test_evaluate_quality_reports_agreement_with_known_errors(tmp_path, shared_data):
    out = tmp_path / "quality.json"
    assert main(["--data-root", str(shared_data), "evaluate", "--task", "quality", "--split", "val", "--pairs", "2", "--per-pair", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    s = report["summary"]
    assert report["task"] == "quality" and s["n_pairs"] == 2 and s["n_samples"] == 8
    assert -1 <= s["spearman"] <= 1 and 0 <= s["auroc"] <= 1 and 0 <= s["within_1_5mm"] <= 1
    assert all(r["tre_mm"] >= 0 and r["gland_error_mm"] >= 0 for r in report["pairs"])
    # the bound: how the gland error itself (what the images show) ranks the landmark TRE
    assert s["gland_error_spearman"] < -0.5 and 0.5 < s["gland_error_auroc"] <= 1
    # the glands' misfit is measured on every sample; the shipped card holds no gland calibration, so the
    # report's estimate is the critic's
    assert all(r["gland_misfit_mm"] >= 0 for r in report["pairs"] if np.isfinite(r["gland_misfit_mm"]))
    assert -1 <= s["gland_misfit_spearman"] <= 1 and "report_spearman" not in s
    assert main(["--data-root", str(shared_data), "evaluate", "--task", "quality", "--per-pair", "0", "--json", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()


def test_calibrate_writes_the_named_models_card_only(tmp_path, shared_data, repo_root):
    """`priorreg calibrate --out` writes a calibrated copy of the shipped critic (its calibration, and with
    --glands the blend's) and leaves the shipped model as it was; bad numbers write nothing."""
    shipped = repo_root / "Resources" / "Models" / "airnet_mrus"
    before = {suffix: shipped.with_suffix(suffix).read_bytes() for suffix in (".safetensors", ".json")}
    copy = tmp_path / "cal" / "copy.safetensors"
    base = ["--data-root", str(shared_data), "calibrate", "--model", "airnet_mrus", "--out", str(copy)]
    assert main([*base, "--per-pair", "0"]) == 2 and not copy.parent.exists()
    assert main([*base[:-1], str(tmp_path / "copy.pt")]) == 2 and not (tmp_path / "copy.pt").exists()
    assert main([*base, "--pairs", "2", "--per-pair", "3", "--glands", "glands_mrus"]) == 0
    card = json.loads(copy.with_suffix(".json").read_text())
    cal, glands = card["calibration"], card["gland_calibration"]
    assert cal["n"] == 6 and len(cal["pairs"]) == 2 and np.all(np.diff(cal["tre_mm"]) <= 1e-9)
    assert glands["glands"] == "glands_mrus" and 0 <= glands["weight"] <= 1 and np.all(np.diff(glands["tre_mm"]) >= -1e-9)
    assert -1 <= card["validation"]["with_glands_spearman"] <= 1
    assert copy.read_bytes() == before[".safetensors"]
    assert all(shipped.with_suffix(suffix).read_bytes() == content for suffix, content in before.items())


def test_dip_and_iterative_schedules_from_the_command_line(tmp_path, shared_data, capsys):
    """--levels/--steps/--similarity/--smooth-weight reach DIP and iterative, --max-seconds and --dip-network DIP (what ran is in metrics.json); misuse and nonsense values are one line, nothing written."""
    out = tmp_path / "dip"
    base = ["--data-root", str(shared_data), "register", "--sample", "mrus", "--init", "centres"]
    assert main([*base, "--method", "dip", "--levels", "4", "--steps", "6", "--dip-network", "paper", "--similarity", "mi", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["options"]["levels"] == [4.0] and report["options"]["steps"] == [6] and report["steps_run"] == 6
    assert report["options"]["network"] == "paper" and report["options"]["similarity"] == "mi"
    assert report["registered"]["tre_rms_mm"] < report["identity"]["tre_rms_mm"]  # the centred start and six coarse steps
    out = tmp_path / "iterative"
    assert main([*base, "--method", "iterative", "--levels", "4", "--steps", "3", "--similarity", "mae", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["options"]["levels"] == [4.0] and report["steps_run"] == 100 + 3  # the affine stage's 100, then 3 at 1/4
    assert report["options"]["similarity"] == "mae"
    # evaluate passes the schedule and the similarity on too (until 2026-12-01 it dropped --similarity for iterative and dip)
    out = tmp_path / "evaluated.json"
    evaluate = ["--data-root", str(shared_data), "evaluate", "--task", "mrus_prostate", "--pairs", "1", "--json", str(out)]
    assert main([*evaluate, "--method", "iterative", "--levels", "4", "--steps", "3", "--similarity", "mse", "--smooth-weight", "2", "--image-weight", "0.5"]) == 0
    options = {"device": "auto", "smooth_weight": 2.0, "image_weight": 0.5, "levels": [4.0], "steps": [3], "similarity": "mse"}
    assert json.loads(out.read_text())["options"] == options
    capsys.readouterr()
    for args, message in (
        (["--method", "dip", "--levels", "2", "1", "--steps", "100"], "one step count per level"),
        (["--method", "dip", "--steps", "100"], "together"),
        (["--method", "iterative", "--max-seconds", "5"], "DIP's time budget"),
        (["--method", "iterative", "--dip-network", "paper"], "--dip-network is DIP's network"),
        (["--method", "adversarial", "--levels", "4", "--steps", "5"], "schedule of dip and iterative"),
        (["--method", "centres", "--similarity", "mae"], "--similarity is for iterative, dip"),
        (["--method", "symmetric", "--similarity", "mae"], "--similarity is for iterative, dip"),  # no --finetune-steps: nothing would use it
        (["--method", "adversarial", "--smooth-weight", "1"], "--smooth-weight is for --method iterative, dip, segreg"),
        (["--method", "dip", "--image-weight", "1"], "--image-weight is for --method iterative, segreg"),
        # values that would run and mislead: a negative weight rewards what it should penalise (the loss falls without bound)
        (["--method", "iterative", "--smooth-weight", "-1"], "weights must be 0 or more; got smooth_weight -1.0"),
        (["--method", "iterative", "--image-weight", "0"], "image_weight 0 leaves nothing to align"),
        (["--method", "dip", "--levels", "0.5", "--steps", "10"], "downsampling factors, 1 (full resolution) or more"),
        (["--method", "iterative", "--levels", "2", "--steps", "0"], "1 step or more"),
        (["--method", "dip", "--max-seconds", "0"], "max_seconds must be more than 0"),
        (["--method", "adversarial", "--finetune-steps", "-1"], "--finetune-steps: 0 or more"),
    ):
        assert main([*base, *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    (tmp_path / "a_file").write_text("")  # refused before the registration runs, not when its outputs are written
    assert main([*base, "--method", "centres", "--out", str(tmp_path / "a_file")]) == 2
    assert "a file is there; give a folder" in capsys.readouterr().err
    assert main([*evaluate, "--method", "identity", "--pairs", "0"]) == 2
    assert "n_pairs: 1 or more, got 0" in capsys.readouterr().err
