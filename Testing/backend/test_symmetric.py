"""Seed 004 (symmetric spatial-gradient registration): integration, symmetry, geometry, trainer, shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from priorreg import data
from priorreg.cli import main
from priorreg.evaluate import pair_metrics
from priorreg.jacobian import jacobian_stats
from priorreg.methods import symmetric as sym
from priorreg.methods.adversarial import ModelFrame
from priorreg.models import load_model
from priorreg.nets.symnet import SymNet
from priorreg.registration import register
from priorreg.spatial import Grid, field_tensor, resample
from priorreg.train import load_config, train

from .geometry import fixed_volume, moving_volume


def test_gradients_integrate_to_the_grid_they_describe():
    # gradient 1 everywhere: the identity, at full and at half resolution
    assert sym.gradients_to_displacement(torch.ones(1, 3, 4, 5, 6), 2.0, (4, 5, 6)).abs().max() == 0
    assert sym.gradients_to_displacement(torch.ones(1, 3, 2, 3, 4), 2.0, (4, 6, 8)).abs().max() == 0
    # gradient 1.5 along x: position cumsum = 1.5 (i + 1), displacement (0.5 i + 0.5) voxels of 2 mm
    g = torch.ones(1, 3, 4, 5, 6)
    g[:, 0] = 1.5
    u = sym.gradients_to_displacement(g, 2.0, (4, 5, 6))
    expected = 2.0 * (0.5 * torch.arange(6.0) + 0.5)
    assert torch.allclose(u[0, 0], expected.expand(4, 5, 6)) and u[0, 1:].abs().max() == 0
    # any positive gradients: the mapped coordinate strictly increases along its own axis (no folding there)
    g = torch.rand(2, 3, 6, 7, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1e-3
    u = sym.gradients_to_displacement(g, 1.0, (6, 7, 8))
    k, j, i = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    mapped = u + torch.stack([i, j, k])[None]
    assert (mapped[:, 0].diff(dim=3) > 0).all() and (mapped[:, 1].diff(dim=2) > 0).all() and (mapped[:, 2].diff(dim=1) > 0).all()


def test_one_network_gives_both_directions_and_starts_at_the_identity():
    net = SymNet((4, 8, 16, 16), output_level=1, heads=2)
    f, m = torch.rand(2, 1, 16, 24, 16), torch.rand(2, 1, 16, 24, 16)
    forward, backward = net(f, m)
    assert [tuple(g.shape) for g in forward] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 4)]
    assert all((g == 1).all() for g in forward + backward)  # zero-initialised heads: gradient 1, identity
    torch.nn.init.normal_(net.heads[0].weight, std=0.5)
    forward, backward = net(f, m)
    swapped_forward, swapped_backward = net(m, f)
    assert not torch.allclose(forward[0], backward[0])
    # subtraction fusion: swapping the inputs swaps the directions, exactly
    assert torch.allclose(forward[0], swapped_backward[0]) and torch.allclose(backward[0], swapped_forward[0])
    assert torch.allclose(net(f, m, both=False)[0], forward[0])


def _loaded(frame: ModelFrame, gradient_x: float = 1.0) -> sym.LoadedSymmetric:
    """An untrained network whose finest head outputs a constant gradient along the frame's x axis."""
    card = sym.model_card(frame, (4, 8, 16), 1, 1, "centres")
    net = sym.build_network(card)
    torch.nn.init.constant_(net.heads[0].bias[:1], float(np.log(gradient_x / (2 - gradient_x))))  # 2 sigmoid(b) = g
    return sym.LoadedSymmetric(net.eval(), card, "cpu")


def test_fields_are_physical_on_oblique_anisotropic_grids():
    """Identity network: the field is the centring translation; a constant gradient: a stretch along the frame's x."""
    fixed, moving = fixed_volume(), moving_volume()
    frame = ModelFrame((16, 24, 20), 1.5, 0)
    fg, mg = Grid.of(fixed), Grid.of(moving)
    result = sym.register_symmetric(fixed, moving, loaded=_loaded(frame), init="centres")
    u = field_tensor(result.field, torch.float64)[0]
    shift = torch.as_tensor(mg.center - fg.center)
    assert torch.allclose(u, shift[:, None, None, None].expand_as(u), atol=1e-6)
    back = field_tensor(result.inverse_field, torch.float64)[0]
    assert Grid.of(result.inverse_field).matches(mg)
    assert torch.allclose(back, -shift[:, None, None, None].expand_as(back), atol=1e-6)
    assert Grid.of(result.warped).matches(fg)

    stretched = sym.register_symmetric(fixed, moving, loaded=_loaded(frame, 1.2), init="geometry").field
    # the frame's x axis is the fixed image's first direction column; along it the map stretches by 1.2
    x_axis = torch.as_tensor(fg.direction[:, 0])
    u = field_tensor(stretched, torch.float64)[0].reshape(3, -1).T
    points = fg.points(torch.float64).reshape(-1, 3)
    inside = ((points - torch.as_tensor(fg.center)) @ torch.as_tensor(fg.direction)).abs().max(1).values < 8  # within the frame
    along = (points[inside] - torch.as_tensor(fg.center)) @ x_axis
    moved = u[inside] @ x_axis
    slope = np.polyfit(along.numpy(), moved.numpy(), 1)[0]
    assert slope == pytest.approx(0.2, abs=0.01)
    off_axis = u[inside] - moved[:, None] * x_axis
    assert off_axis.abs().max() < 1e-6


def test_a_short_training_run_writes_a_model_that_registers(tmp_path, shared_data):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({
        "method": "symmetric", "name": "tiny", "data": {"root": str(shared_data), "limit": 6, "val_pairs": 2},
        "frame": {"shape": [24, 32, 24], "spacing": 2.0, "margin": 0},
        "network": {"channels": [4, 8, 16, 16], "output_level": 1, "heads": 2},
        "iterations": 3, "batch_size": 2, "validate_every": 3, "checkpoint_every": 2, "device": "cpu",
    }))  # fmt: skip
    config = load_config(config_file)
    last = train(config, tmp_path / "run")
    assert last["iteration"] == 3 and 0 < last["val_dice"] < 1 and np.isfinite(last["val_hd95_mm"])
    tensors, card, _ = load_model(tmp_path / "run" / "tiny.safetensors")
    assert card["method"] == "symmetric" and card["training"]["iterations"] == 3
    test_subjects = set(card["training"]["patients"]["test"])
    assert not test_subjects & set(card["training"]["train_subjects"])  # subjects, never pairs across splits
    pair = data.hippocampus_pairs(shared_data, subjects=sorted(test_subjects))[0]
    v = pair.load()
    result = register(v.fixed, v.moving, method="symmetric", model=tmp_path / "run" / "tiny.safetensors", device="cpu")
    assert Grid.of(result.field).matches(Grid.of(v.fixed))
    # fine-tuning a copy on this pair's labels: the Dice of those labels rises, the model file's weights stay
    loaded = sym.LoadedSymmetric.load(tmp_path / "run" / "tiny.safetensors", "cpu")
    before = {k: t.clone() for k, t in loaded.net.state_dict().items()}
    labelled = {"fixed_labels": v.fixed_labels, "moving_labels": v.moving_labels}
    plain = sym.register_symmetric(v.fixed, v.moving, loaded=loaded, **labelled)
    steps = []
    tuned = sym.register_symmetric(
        v.fixed, v.moving, loaded=loaded, finetune_steps=15, finetune_lr=1e-2, similarity=None, progress=steps.append, **labelled
    )
    dice = [pair_metrics(r.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)["dice_mean"] for r in (plain, tuned)]
    assert dice[1] > dice[0] + 0.02, dice
    assert [p.step for p in steps] == list(range(1, 17)) and tuned.method == "symmetric+finetune"
    assert all(torch.equal(before[k], t) for k, t in loaded.net.state_dict().items())
    with pytest.raises(ValueError, match="needs an image similarity or labels"):
        sym.register_symmetric(v.fixed, v.moving, loaded=loaded, finetune_steps=2, similarity=None)
    with pytest.raises(ValueError, match="frame.shape"):
        load_config(config_file, frame={"shape": [20, 32, 24], "spacing": 2.0, "margin": 0})


def test_evaluation_splits_subjects_before_pairing(shared_data):
    from priorreg.evaluate import evaluate_task
    from priorreg.train_symmetric import DEFAULTS, subject_splits

    splits = subject_splits({**DEFAULTS["data"], "root": shared_data})
    report = evaluate_task("hippocampus", "identity", shared_data, n_pairs=3, split="test")
    assert len(report["pairs"]) == 3
    for row in report["pairs"]:
        moving, fixed = row["id"].split("_to_")
        assert {moving, fixed} <= set(splits["test"])


def test_the_shipped_model_registers_held_out_subjects(tmp_path, shared_data):
    """`priorreg evaluate --task hippocampus --method symmetric --split test` on subjects it never saw."""
    out = tmp_path / "symmetric.json"
    args = ["--data-root", str(shared_data), "evaluate", "--task", "hippocampus", "--split", "test", "--pairs", "6", "--device", "cpu"]
    assert main([*args, "--method", "symmetric", "--json", str(out)]) == 0
    assert main([*args, "--method", "centres", "--json", str(tmp_path / "centres.json")]) == 0
    learned, centred = (json.loads(p.read_text()) for p in (out, tmp_path / "centres.json"))
    assert [p["id"] for p in learned["pairs"]] == [p["id"] for p in centred["pairs"]]
    s = learned["summary"]
    # centres 0.45 -> 0.77, HD95 4.7 -> 2.4 mm, SDlogJ 0.29, 0.02 % folding when written (the card's figures,
    # its 1 mm smoothing included: 45 test pairs, Dice 0.76, SDlogJ 0.21); the CPU-trained network's: SDlogJ 0.12
    assert s["dice_mean"] > centred["summary"]["dice_mean"] + 0.15, (centred["summary"]["dice_mean"], s["dice_mean"])
    assert s["dice_mean"] > 0.72 and s["hd95_mm"] < centred["summary"]["hd95_mm"] - 1.0
    assert s["folding_pct"] < 0.2 and 0 < s["sdlogj"] < 0.7
    card = load_model("symmetric_hippocampus")[1]
    held_out = set(card["training"]["patients"]["test"])
    assert all(set(p["id"].split("_to_")) <= held_out for p in learned["pairs"])


def test_the_cards_smoothing_tames_the_field_and_keeps_the_dice(tmp_path, shared_data, capsys):
    """The shipped card's `postprocessing.smooth_mm` on held-out pairs: a smoother field at about the same Dice.

    When written, on these 4 pairs: Dice 0.81 either way; SDlogJ 0.25 -> 0.17, folding 0.005 -> 0 %.
    """
    card = load_model("symmetric_hippocampus")[1]
    assert card["postprocessing"]["smooth_mm"] == 1.0
    loaded = sym.LoadedSymmetric.load("symmetric_hippocampus", "cpu")
    rows = {"raw": [], "card": []}
    for pair in data.hippocampus_pairs(shared_data, subjects=card["training"]["patients"]["test"])[:4]:
        v = pair.load()
        for name, smooth in (("raw", 0.0), ("card", None)):
            r = sym.register_symmetric(v.fixed, v.moving, loaded=loaded, smooth_mm=smooth)
            rows[name].append(pair_metrics(r.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels))
    mean = {name: {k: float(np.mean([r[k] for r in rs])) for k in ("dice_mean", "sdlogj")} for name, rs in rows.items()}
    assert mean["card"]["sdlogj"] < 0.75 * mean["raw"]["sdlogj"], mean
    assert abs(mean["card"]["dice_mean"] - mean["raw"]["dice_mean"]) < 0.01, mean
    with pytest.raises(ValueError, match="smooth_mm must be 0 or more"):
        sym.register_symmetric(v.fixed, v.moving, loaded=loaded, smooth_mm=-1.0)
    for method in ("centres", "iterative"):  # an option of one method is an error for the others, never ignored
        args = ["register", "--fixed", str(pair.fixed), "--moving", str(pair.moving), "--method", method, "--smooth-mm", "1"]
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        assert "--smooth-mm is for --method symmetric" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_register_writes_both_directions_consistently(tmp_path, shared_data):
    """The forward field and the inverse the same pass predicts nearly undo each other (symmetric training)."""
    from priorreg.quality import inverse_consistency

    card = load_model("symmetric_hippocampus")[1]
    pair = data.hippocampus_pairs(shared_data, subjects=card["training"]["patients"]["test"])[1]
    v = pair.load()
    result = register(v.fixed, v.moving, method="symmetric", device="cpu")
    stats = jacobian_stats(result.field)
    assert stats["folding_pct"] < 0.5
    assert np.abs(result.field.array).max() > 1.0  # it does deform
    no_inverse = result.inverse_field.with_array(0 * result.inverse_field.array)
    assert inverse_consistency(result.field, result.inverse_field) < 0.5 * inverse_consistency(result.field, no_inverse)
    warped = resample(v.moving, v.fixed, result.field, mode="linear")
    np.testing.assert_allclose(result.warped.array, warped.array, rtol=1e-5, atol=1e-3)
