"""The benchmark harness on a tiny subset, so it cannot rot (full runs are not in CI)."""

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.peers import available
from priorreg.evaluate import evaluate_task


def test_accuracy_suite_on_one_pair(tmp_path, shared_data):
    out = tmp_path / "bench"
    assert main(["run", "--tasks", "hippocampus", "--pairs", "1", "--methods", "identity", "centres",
                 "--peers", "ants_syn", "--data-root", str(shared_data), "--out", str(out)]) == 0
    reports = json.loads((out / "hippocampus.json").read_text())
    assert set(reports) == {"identity", "centres", "ants_syn"}
    direct = evaluate_task("hippocampus", "identity", shared_data, 1, split="test")["summary"]
    assert reports["identity"]["summary"]["dice_mean"] == pytest.approx(direct["dice_mean"])
    table = (out / "results.md").read_text()
    assert "| identity | 1 |" in table and (out / "hippocampus.png").stat().st_size > 1000
    if available("ants_syn"):  # a real peer on the same pair: scored by the same code
        assert reports["ants_syn"]["summary"]["dice_mean"] > direct["dice_mean"]
    else:  # reported, never silently dropped
        assert "missing" in reports["ants_syn"] and "| ants_syn | missing" in table

    # --merge: a method joins the suite without rerunning the others; the table names both runs.
    assert main(["run", "--tasks", "hippocampus", "--pairs", "1", "--methods", "centres", "--peers", "affine", "--merge",
                 "--data-root", str(shared_data), "--out", str(out)]) == 0  # fmt: skip
    merged = json.loads((out / "hippocampus.json").read_text())
    assert list(merged) == ["identity", "centres", "ants_syn", "affine"]
    assert merged["identity"] == reports["identity"] and "--merge" in merged["centres"]["run"]["command"]
    assert 0 < merged["affine"]["summary"]["dice_mean"] <= 1
    header = (out / "hippocampus.md").read_text()
    assert "--peers ants_syn --data-root" in header and "(identity, ants_syn)" in header and "(centres, affine)" in header
    with pytest.raises(ValueError, match="other pairs"):
        main(["run", "--tasks", "hippocampus", "--pairs", "2", "--methods", "identity", "--peers", "--merge",
              "--data-root", str(shared_data), "--out", str(out)])  # fmt: skip


def test_the_readme_shows_the_committed_results(repo_root, tmp_path):
    """`python -m bench readme` has been run: the README's block is bench/results/results.md, verbatim."""
    from bench.readme import BEGIN, END, block, update

    results = repo_root / "bench" / "results" / "results.md"
    assert block((repo_root / "README.md").read_text()) == results.read_text().strip("\n")
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n{BEGIN}\n| old | table |\n{END}\nafter\n")
    assert update(stale, results) and not update(stale, results)
    text = stale.read_text()
    assert "| old | table |" not in text and text.endswith(f"{END}\nafter\n") and block(text) == results.read_text().strip("\n")


def test_regularizer_table_trains_reuses_and_scores_on_held_out_patients(tmp_path, shared_data, smooth_fields):
    """Seed 000's Table 1 harness with two-iteration networks: every row, test patients only."""
    import yaml

    from bench.regularizers import CONFIGS, VARIANTS, run
    from priorreg.data import mrus_pairs, split_by_patient

    configs = tmp_path / "configs"
    configs.mkdir()
    for variant in VARIANTS:
        config = yaml.safe_load((CONFIGS / f"mrus_{variant}.yaml").read_text())
        config.update(iterations=2, batch_size=2, validate_every=0, frame={"shape": [16, 16, 16], "spacing": 6.0, "margin": 4},
                      network={"n0": 2, "depth": 2}, data={**config["data"], "limit": 2})  # fmt: skip
        (configs / f"mrus_{variant}.yaml").write_text(yaml.safe_dump(config))
    sims = smooth_fields(tmp_path / "sims", n=2)
    text = run(shared_data, sims, tmp_path / "models", tmp_path / "out", "val", configs)
    reports = json.loads((tmp_path / "out" / "mrus_regularizers.json").read_text())
    assert list(reports) == ["identity", "centres", *VARIANTS]
    val_ids = {p.id for p in split_by_patient(mrus_pairs(shared_data))["val"]}
    for name, report in reports.items():
        assert {p["id"] for p in report["pairs"]} == val_ids, name
        assert f"| {name} | {len(val_ids)} |" in text
    assert reports["bending"]["card"]["config"]["regularizer"] == "bending"
    assert not set(reports["adversarial"]["card"]["train_pairs"]) & val_ids
    stamp = (tmp_path / "models" / "mrus_none" / "mrus_none.safetensors").stat().st_mtime_ns
    run(shared_data, sims, tmp_path / "models", tmp_path / "out2", "val", configs)  # finished models are reused
    assert (tmp_path / "models" / "mrus_none" / "mrus_none.safetensors").stat().st_mtime_ns == stamp


def test_speed_suite_times_each_method_in_its_own_process(tmp_path, shared_data):
    out = tmp_path / "speed"
    assert main(["speed", "--methods", "identity", "centres", "affine", "--sizes", "mrus", "64", "--repeats", "2",
                 "--data-root", str(shared_data), "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "speed.json").read_text())
    for size in ("mrus", "64"):
        for method in ("identity", "centres", "affine"):
            r = report["results"][size][method]
            assert len(r["times"]) == 2 and r["seconds"] == pytest.approx(sorted(r["times"])[0] / 2 + sorted(r["times"])[1] / 2)
            assert r["peak_rss_mb"] > 50 and r["run"] == 0  # a real process that imported torch
    affine = report["results"]["64"]["affine"]["seconds"]
    table = (out / "speed.md").read_text()
    assert "| 64 | affine |" in table and " 1x |" in table and (out / "speed.png").stat().st_size > 1000
    centres = report["results"]["64"]["centres"]["seconds"]
    assert f"| 64 | centres | {centres:.3g} | 2 | {centres / affine:.2g}x |" in table  # the ratio to the fastest peer

    # --merge: one cell remeasured by its own command, the others kept, each row naming its run.
    assert main(["speed", "--methods", "identity", "--sizes", "64", "--repeats", "1", "--merge",
                 "--data-root", str(shared_data), "--out", str(out)]) == 0  # fmt: skip
    merged = json.loads((out / "speed.json").read_text())
    assert [run["command"].split("--methods ")[1].split(" --")[0] for run in merged["runs"]] == ["identity centres affine", "identity"]
    assert merged["results"]["64"]["identity"]["run"] == 1 and len(merged["results"]["64"]["identity"]["times"]) == 1
    assert merged["results"]["mrus"] == report["results"]["mrus"] and merged["results"]["64"]["affine"]["seconds"] == affine
    table = (out / "speed.md").read_text()
    assert "- run 0:" in table and "- run 1:" in table and "| 64 | identity |" in table


def test_peak_memory_is_the_measured_process_own_not_its_parents(shared_data):
    """A method's process starts from the bench process (spawn = fork + exec); its peak must not include the parent's size."""
    import numpy as np

    from bench.speed import measure, peak_rss_mb

    ballast = np.ones(100_000_000)  # 800 MB in this (parent) process
    assert peak_rss_mb() > 800
    r = measure("identity", "mrus", str(shared_data), repeats=1)
    assert 100 < r["peak_rss_mb"] < 700, r  # torch, SimpleITK and one MR-US pair: about 0.4 GB
    del ballast


def test_a_trained_method_runs_its_shipped_model_and_without_one_is_listed_with_the_reason(tmp_path, shared_data, monkeypatch):
    import bench.__main__ as bench_main

    def run(out):
        assert main(["run", "--tasks", "brain_t1t2", "--pairs", "1", "--split", "test", "--methods", "identity", "deformgan",
                     "--peers", "--data-root", str(shared_data), "--out", str(out)]) == 0  # fmt: skip
        return json.loads((out / "brain_t1t2.json").read_text())

    reports = run(tmp_path / "shipped")
    assert reports["identity"]["summary"]["epe_mm"] > 5.0  # the known deformation, unrecovered
    (pair,) = reports["identity"]["pairs"]
    assert reports["identity"]["split"] == "test" and pair["id"].startswith("tumor_Study3")  # --split: the held-back set
    assert reports["deformgan"]["summary"]["epe_mm"] < 3.0 and reports["deformgan"]["pairs"][0]["id"] == pair["id"]
    monkeypatch.setattr(bench_main, "available_models", lambda: {})  # as on a checkout without Resources/Models
    assert "bench/configs/deformgan_brain.yaml" in run(tmp_path / "unshipped")["deformgan"]["missing"]


def test_ship_writes_the_test_figures_and_baselines_into_the_card(tmp_path, shared_data):
    """`python -m bench ship --baselines`: the card carries what the model and the baselines measured on the same pairs."""
    from priorreg.cli import main as priorreg
    from priorreg.models import load_model

    def evaluate(method, n):
        out = tmp_path / f"{method}_{n}.json"
        args = ["--data-root", str(shared_data), "evaluate", "--task", "hippocampus", "--split", "test", "--pairs", str(n)]
        assert priorreg([*args, "--device", "cpu", "--method", method, "--json", str(out)]) == 0
        return out

    model, centres, other_pairs = evaluate("symmetric", 2), evaluate("centres", 2), evaluate("centres", 3)
    dest = tmp_path / "models"
    args = ["ship", "--results", str(model), "--variant", "symmetric", "--name", "shipped", "--dest", str(dest)]
    assert main([*args, "--baselines", str(centres)]) == 0
    card = load_model(dest / "shipped.safetensors")[1]
    report, baseline = (json.loads(p.read_text()) for p in (model, centres))
    assert card["metrics"]["summary"] == report["summary"] and card["metrics"]["split"] == "test"
    assert card["metrics"]["baselines"] == {"centres": baseline["summary"]}
    assert card["metrics"]["summary"]["dice_mean"] > baseline["summary"]["dice_mean"]
    with pytest.raises(ValueError, match="not the model's evaluation pairs"):
        main([*args, "--baselines", str(other_pairs)])


def test_oasis_suite_scores_atlas_to_subject_brains(tmp_path, shared_data):
    """The `oasis` suite (seed 003's table: Dice over 35 structures, SSIM, det J) on one full-size brain."""
    out = tmp_path / "bench"
    assert main(["run", "--tasks", "oasis", "--pairs", "1", "--methods", "identity", "--peers", "--data-root", str(shared_data), "--out", str(out)]) == 0
    s = json.loads((out / "oasis.json").read_text())["identity"]["summary"]
    assert s["n_pairs"] == 1 and 0.3 < s["dice_mean"] < 0.8  # affinely pre-aligned brains: overlap without registration
    assert s["detj_mean"] == pytest.approx(1.0) and s["detj_std"] == 0 and 0 < s["ssim"] < 1
    assert "| identity | 1 |" in (out / "results.md").read_text()


def test_affine_peer_recovers_a_known_affine_on_an_oblique_anisotropic_volume(shared_data):
    """The `affine` peer's field is PriorReg's convention (fixed point -> moving point, LPS mm): a known
    12-parameter transform of a real MR, on an oblique grid with 1 x 1.4 x 2.2 mm voxels, comes back
    within a millimetre."""
    import numpy as np
    import SimpleITK as sitk

    from bench.peers import PEERS
    from priorreg import Volume
    from priorreg.data import mrus_pairs

    mr = mrus_pairs(shared_data)[0].load().moving
    angle = np.deg2rad(20)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    fixed = Volume(mr.array.astype(np.float32), (1.0, 1.4, 2.2), (-30.0, 12.0, 5.0), direction)
    image = fixed.to_sitk()
    truth = sitk.AffineTransform(3)
    truth.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rotation = sitk.VersorTransform((0.3, 0.5, 0.8), np.deg2rad(8)).GetMatrix()
    truth.SetMatrix((np.array(rotation).reshape(3, 3) @ np.diag([1.06, 0.95, 1.0])).ravel().tolist())
    truth.SetTranslation((4.0, -3.0, 2.0))
    moving = Volume.from_sitk(sitk.Resample(image, image, truth.GetInverse(), sitk.sitkLinear, 0.0))  # m(T(x)) = f(x)

    field = PEERS["affine"][1](fixed, moving)
    expected = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        truth, sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()))
    expected = np.moveaxis(expected, -1, 0)  # [c, k, j, i] as Volume keeps vectors
    inside = fixed.array > np.percentile(fixed.array, 50)  # where the MR has content
    error = np.linalg.norm(field.array - expected, axis=0)[inside]
    assert np.linalg.norm(expected, axis=0)[inside].mean() > 4.0  # the task is not trivial
    assert np.median(error) < 1.0 and np.percentile(error, 95) < 2.0


def test_airnet_comparison_scores_models_and_merges_runs(tmp_path, shared_data, repo_root):
    """`python -m bench airnet`: a model's quality score and registration on the test patients; `--merge` adds a model
    to the table without rescoring the others, and refuses a table of other alignments."""
    import shutil

    shipped = repo_root / "Resources" / "Models" / "airnet_mrus.safetensors"
    other = tmp_path / "other.safetensors"
    shutil.copyfile(shipped, other)
    shutil.copyfile(shipped.with_suffix(".json"), other.with_suffix(".json"))
    out = tmp_path / "cmp"
    common = ["--data-root", str(shared_data), "--pairs", "3", "--per-pair", "4", "--out", str(out)]
    assert main(["airnet", "--models", str(shipped), *common]) == 0
    first = json.loads((out / "airnet_mrus.json").read_text())
    (row,) = first["results"]
    assert row["quality"]["n_pairs"] == 3 and -1 <= row["quality"]["spearman"] < 0  # a worse alignment scores lower
    assert row["recovery_1"]["tre_before_mm"] > 2 and row["from_centres_centres"]["tre_median_mm"] > 5
    assert main(["airnet", "--models", str(other), "--merge", *common]) == 0
    merged = json.loads((out / "airnet_mrus.json").read_text())
    assert [(Path(r["model"]).stem, r["run"]) for r in merged["results"]] == [("airnet_mrus", 0), ("other", 1)]
    assert merged["results"][0] == {**row, "run": 0}  # kept, not rescored
    assert merged["results"][1]["quality"] == row["quality"]  # the same weights score the same alignments alike
    table = (out / "airnet_mrus.md").read_text()
    assert "| airnet_mrus | 0 |" in table and "| other | 1 |" in table and "--merge" in table
    with pytest.raises(ValueError, match="other alignments"):
        main(["airnet", "--models", str(other), "--merge", *common[:-3], "3", "--out", str(out)])


def test_a_baseline_is_named_for_its_fine_tuning_and_whose_expert_labels_it_was_given():
    from bench.regularizers import _baseline_name

    assert _baseline_name({"method": "centres", "label_channels": None}) == "centres"
    tuned = {"method": "deformgan", "options": {"finetune_steps": 100}, "label_channels": None}
    assert _baseline_name(tuned) == "deformgan fine-tuned 100 steps on each pair"
    both = {"method": "glands", "label_channels": [0], "label_roles": ["fixed", "moving"]}
    assert _baseline_name(both) == "glands with expert label channels [0]"
    assert _baseline_name({**both, "label_roles": ["moving"]}) == "glands with expert label channels [0] of the moving image"
