"""Shared fixtures: the real data root (tests skip with a clear message where it is absent)."""

from pathlib import Path

import pytest

from priorreg.data import data_root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}; set PRIORREG_DATA to the folder holding the data sets")
    return root


@pytest.fixture
def artifacts_dir(request) -> Path:
    """A folder kept after the run (CI artifacts): Testing/artifacts/<test name>."""
    out = Path(__file__).parent / "artifacts" / request.node.name
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
