"""The VoxelMorph peer: its fields mean what VoxelMorph's own warp does, and it trains, loads and runs in the bench."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("voxelmorph", reason="the VoxelMorph peer needs the voxelmorph package (pip install .[test] or .[bench])")

from bench import voxelmorph as vm  # noqa: E402
from bench.__main__ import main  # noqa: E402
from priorreg import Volume  # noqa: E402
from priorreg.grid import Grid  # noqa: E402
from priorreg.methods import symmetric as sym  # noqa: E402
from priorreg.methods.adversarial import frame_centres, to_fixed_grid  # noqa: E402
from priorreg.spatial import resample  # noqa: E402
from priorreg.train_symmetric import DEFAULTS as SYMMETRIC  # noqa: E402
from priorreg.train_symmetric import subject_splits
from Testing.backend.geometry import fixed_volume, moving_volume  # noqa: E402


def smooth_voxel_displacement(shape, amplitude: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 3, 4, 3, generator=g) * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def test_the_converted_field_resamples_as_voxelmorphs_own_warp_on_an_oblique_grid():
    """Channel order, units, sign and direction: PriorReg's resampling through the converted
    field reproduces VoxelMorph's SpatialTransformer on the framed moving image."""
    import voxelmorph as vxm

    fixed, moving = fixed_volume(), moving_volume()  # oblique, anisotropic, unrelated grids
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, "centres")
    frame_f, frame_m = vm.FRAME.physical(cf, fg.direction), vm.FRAME.physical(cm, fg.direction)
    scaled = sym.normalise(moving)
    framed_moving = torch.as_tensor(resample(scaled, frame_m).array)[None, None]
    d = smooth_voxel_displacement(vm.FRAME.shape, amplitude=3.0)
    theirs = vxm.nn.modules.SpatialTransformer()(framed_moving, d)[0, 0].numpy()

    def ours(u_model):
        on_frame = Volume(np.zeros(vm.FRAME.shape, np.float32), frame_f.spacing, frame_f.origin, frame_f.direction)
        field = to_fixed_grid(u_model, Grid.of(on_frame), frame_f, cf, cm)
        return resample(scaled, frame_f, field, mode="linear").array

    # Compare where the sampled point is well inside the moving image (both tools pad differently).
    coverage = resample(moving.with_array(np.ones(moving.shape, np.float32)), frame_m).array
    inside = vxm.nn.modules.SpatialTransformer()(torch.as_tensor(coverage)[None, None], d)[0, 0].numpy() > 0.999
    assert inside.sum() > 2000
    error = np.abs(ours(vm.model_field(d, vm.FRAME.spacing)) - theirs)[inside]
    wrong = np.abs(ours(d * vm.FRAME.spacing) - theirs)[inside]  # channels left in (k, j, i) order
    assert error.mean() < 0.01 and np.percentile(error, 99) < 0.05, (error.mean(), np.percentile(error, 99))
    assert wrong.mean() > 5 * error.mean()


def test_the_peer_trains_loads_and_runs_in_the_accuracy_suite(tmp_path, shared_data, monkeypatch):
    weights = tmp_path / "voxelmorph_hippocampus.safetensors"
    monkeypatch.setattr(vm, "WEIGHTS", weights)
    out = tmp_path / "bench"
    args = ["run", "--tasks", "hippocampus", "--pairs", "1", "--methods", "centres", "--peers", "voxelmorph",
            "--data-root", str(shared_data), "--out", str(out)]
    assert main(args) == 0  # not trained yet: reported as missing, with the command that trains it
    reports = json.loads((out / "hippocampus.json").read_text())
    assert "python -m bench voxelmorph" in reports["voxelmorph"]["missing"]

    torch.manual_seed(0)
    vm.train(shared_data, weights, iterations=3, validate_every=3, log=lambda line: None, limit=3)
    card = json.loads(weights.with_suffix(".json").read_text())
    train_subjects = set(card["training"]["subjects"])
    assert card["recipe"]["weights"] == {"mse": 1.0, "grad_l2": 0.01, "dice": 0.01} and len(train_subjects) == 3
    assert 0 < card["final_log"]["val_dice_mean"] < 1 and weights.with_name(weights.stem + "_log.csv").exists()

    assert main(args) == 0
    reports = json.loads((out / "hippocampus.json").read_text())
    pair = reports["voxelmorph"]["pairs"][0]
    test_subjects = subject_splits({**SYMMETRIC["data"], "root": shared_data})["test"]
    assert pair["id"] == reports["centres"]["pairs"][0]["id"] and set(pair["id"].split("_to_")) <= set(test_subjects)
    # Three updates at 1e-4 barely move the network from identity: about the centred result, no folding.
    assert pair["dice_mean"] == pytest.approx(reports["centres"]["pairs"][0]["dice_mean"], abs=0.1)
    assert pair["folding_pct"] == 0 and pair["sdlogj"] < 0.1
