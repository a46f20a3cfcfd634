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


@pytest.fixture
def smooth_fields(shared_data):
    """`make(folder, n)`: n smooth random displacement fields (<= 4 mm) on a real TRUS grid.

    A stand-in distribution for the trainer's mechanics only; the simulator's own
    tests check physically simulated fields.
    """
    import torch

    from priorreg.filters import gaussian_smooth_mm
    from priorreg.spatial import Grid, field_volume, write_field
    from priorreg.volume import Volume

    def make(folder: Path, n: int = 4) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        grid = Grid.of(Volume.read(shared_data / "mrus_prostate" / "fixed_images" / "obs000.nii.gz"))
        g = torch.Generator().manual_seed(0)
        for s in range(n):
            u = gaussian_smooth_mm(torch.randn(1, 3, *grid.shape, generator=g, dtype=torch.float64), grid, 8.0)
            write_field(field_volume((u / u.abs().max() * 4).float(), grid), folder / f"sim{s}.nii.gz")
        return folder

    return make
