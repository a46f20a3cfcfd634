"""`python -m bench readme`: the README's benchmark tables, copied from the run that made them.

`python -m bench run` writes `bench/results/results.md` (its date, machine, versions and
command, then one table per task). The README holds that file verbatim between the markers
below; this rewrites the block, and `Testing/bench/test_bench.py` checks that the two agree,
so the README never shows a figure that the committed results do not.
"""

from __future__ import annotations

from pathlib import Path

BEGIN = "<!-- bench:results begin (python -m bench readme; do not edit by hand) -->"
END = "<!-- bench:results end -->"


def block(readme: str) -> str:
    """The text between the markers (`ValueError` when they are missing or out of order)."""
    start, stop = readme.find(BEGIN), readme.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"the README has no results block: add the lines\n{BEGIN}\n{END}")
    return readme[start + len(BEGIN) : stop].strip("\n")


def update(readme_path: Path, results_path: Path) -> bool:
    """Put `results_path` into the README's block; True when the README changed."""
    readme = readme_path.read_text()
    old = block(readme)
    new = results_path.read_text().strip("\n")
    if old == new:
        return False
    readme_path.write_text(readme.replace(f"{BEGIN}\n{old}\n{END}" if old else f"{BEGIN}\n{END}", f"{BEGIN}\n{new}\n{END}"))
    return True
