"""`python -m bench reproduce`: its steps cover every committed result and config, parse, and run."""

import json
import re
from pathlib import Path

import pytest

from bench import reproduce
from bench.__main__ import build_parser as bench_parser
from bench.regularizers import VARIANTS
from priorreg.cli import build_parser as priorreg_parser

ROOT = Path(__file__).resolve().parents[2]


def step_configs() -> set[str]:
    """The training configs the steps train (`bench regularizers` trains `mrus_<variant>.yaml` itself)."""
    named = {m for step in reproduce.STEPS for c in step.commands for m in re.findall(r"bench/configs/([\w.]+)\.yaml", c)}
    if any("bench regularizers" in c for step in reproduce.STEPS for c in step.commands):
        named |= {f"mrus_{v}" for v in VARIANTS}
    return named


def test_every_committed_result_has_a_step():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").rglob("*") if p.is_file())
    assert len(files) > 30
    orphans = [f for f in files if reproduce.writer(f) is None]
    assert orphans == [], f"no step of bench/reproduce.py writes {orphans}: add it to a step's `writes` (or to ARCHIVED, with why)"
    assert reproduce.writer("bench/results/speed.md") == "speed"
    assert reproduce.writer("bench/results/airnet_logs/airnet_mrus_clip.csv") == "airnet"


def test_every_config_and_every_shipped_model_is_trained_by_a_step():
    configs = {p.stem for p in (ROOT / "bench" / "configs").glob("*.yaml")}
    assert sorted(configs - step_configs()) == []
    assert sorted(step_configs() - configs) == [], "a step trains a config that does not exist"
    for card in (ROOT / "Resources" / "Models").glob("*.json"):
        (config,) = re.findall(r"bench/configs/([\w.]+)\.yaml", json.loads(card.read_text())["training"]["command"])
        assert config in step_configs(), f"{card.name} was trained from {config}.yaml, which no step trains"


@pytest.mark.parametrize("step", reproduce.STEPS, ids=lambda s: s.name)
def test_every_command_parses_with_todays_command_lines(step, tmp_path):
    """A renamed flag or subcommand breaks the recipe here, not hours into a rerun."""
    assert step.commands
    for command in step.commands:
        words = reproduce.argv(command, "/data", str(tmp_path))
        assert words[:3] == [words[0], "-m", words[2]] and words[2] in ("priorreg", "bench"), words
        parser = priorreg_parser() if words[2] == "priorreg" else bench_parser()
        try:
            parser.parse_args(words[3:])
        except SystemExit as error:
            pytest.fail(f"{command!r} does not parse (exit {error.code})")
        assert "{" not in " ".join(words), f"a placeholder left unfilled in {command!r}"


def test_steps_skip_what_this_machine_or_the_options_exclude():
    steps = dict((s.name, skip) for s, skip in reproduce.chosen(train=False, cuda=False))
    assert list(steps)[-1] == "readme" and steps["accuracy"] is None and steps["speed"] is None
    assert "--train" in steps["airnet"] and "CUDA" in steps["speed_cuda"]
    trained = dict((s.name, skip) for s, skip in reproduce.chosen(train=True, cuda=False))
    assert trained["airnet"] is None and "CUDA" in trained["symmetric_gpu"]
    assert [s.name for s, _ in reproduce.chosen(["speed", "accuracy"], cuda=False)] == ["accuracy", "speed"]
    with pytest.raises(ValueError, match="no step"):
        reproduce.chosen(["nonsense"], cuda=False)


def test_the_runner_runs_steps_copies_and_stops_at_a_failure(monkeypatch, tmp_path, shared_data, capsys):
    report = tmp_path / "runs" / "identity.json"
    steps = (
        reproduce.Step(
            "one", ("priorreg --data-root {data} evaluate --task hippocampus --method identity --split test --pairs 1 "
                    "--json {runs}/identity.json",),  # fmt: skip
            copies=(("{runs}/identity.json", str(tmp_path / "kept" / "identity.json")),),
        ),
        reproduce.Step("broken", ("priorreg --data-root {data} evaluate --task hippocampus --method nonsense --json {runs}/x.json",)),
        reproduce.Step("never", ("priorreg --data-root {data} evaluate --task hippocampus --method identity --pairs 1 --json {runs}/y.json",)),
    )
    monkeypatch.setattr(reproduce, "STEPS", steps)
    assert reproduce.run(str(shared_data), str(tmp_path / "runs"), cuda=False) == 2  # argparse's exit status
    summary = json.loads(report.read_text())["summary"]
    assert summary["n_pairs"] == 1 and 0 < summary["dice_mean"] < 1
    assert json.loads((tmp_path / "kept" / "identity.json").read_text()) == json.loads(report.read_text())
    assert not (tmp_path / "runs" / "y.json").exists()
    assert "step broken failed" in capsys.readouterr().out
