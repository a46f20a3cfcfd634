"""The benchmark harness on a tiny subset, so it cannot rot (full runs are not in CI)."""

import json

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
    direct = evaluate_task("hippocampus", "identity", shared_data, 1)["summary"]
    assert reports["identity"]["summary"]["dice_mean"] == pytest.approx(direct["dice_mean"])
    table = (out / "results.md").read_text()
    assert "| identity | 1 |" in table and (out / "hippocampus.png").stat().st_size > 1000
    if available("ants_syn"):  # a real peer on the same pair: scored by the same code
        assert reports["ants_syn"]["summary"]["dice_mean"] > direct["dice_mean"]
    else:  # reported, never silently dropped
        assert "missing" in reports["ants_syn"] and "| ants_syn | missing" in table
