"""The README opens with exactly two set-up commands, and CI runs the second one verbatim."""

import re

import pytest


def _commands(repo_root):
    blocks = re.findall(r"```bash\n(.*?)\n```", (repo_root / "README.md").read_text(), flags=re.S)
    return blocks[:2]


def test_readme_opens_with_two_commands(repo_root):
    text = (repo_root / "README.md").read_text()
    first, second = _commands(repo_root)
    assert text.index(first) < text.index(second) < text.index("\n## ")
    assert "\n" not in first and "\n" not in second
    assert "priorreg register" in first and "--out" in first
    assert "pytest" in second


def test_ci_runs_the_readme_test_command(repo_root):
    second = _commands(repo_root)[1]
    lines = [l for l in (repo_root / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert second in lines


@pytest.mark.parametrize("name", ["mrus"])
def test_main_job_sample_exists(name):
    from priorreg import data

    assert {e["role"] for e in data.SAMPLES if e["name"] == name} == {"fixed", "moving", "fixed_labels", "moving_labels"}
