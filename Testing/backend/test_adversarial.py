"""Seed 000's networks, losses, model frame and trainer (resume, torchrun) on real MR-US pairs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from priorreg.methods import adversarial as adv
from priorreg.models import save_model
from priorreg.nets.localnet import Discriminator, RegistrationNet
from priorreg.spatial import Grid
from priorreg.train import ConfigError, load_config, train
from priorreg.volume import Volume

from .geometry import fixed_volume, moving_volume


def test_networks_start_at_identity_and_check_their_grid():
    net = RegistrationNet((16, 32, 16), n0=4, depth=3)
    local, affine = net(torch.randn(2, 2, 16, 32, 16))
    assert local.shape == (2, 3, 16, 32, 16) and affine.shape == (2, 3, 4)
    assert affine.abs().max() == 0  # zero-initialised affine branch
    assert local.abs().max() < 1.0  # summands start at N(0, 1e-3) weights: well under a voxel (mm)
    disc = Discriminator((16, 32, 16), n0=4, depth=3)
    assert disc(torch.randn(3, 3, 16, 32, 16)).shape == (3,)
    with pytest.raises(ValueError, match="divisible by 8"):
        RegistrationNet((20, 32, 16), n0=4, depth=3)


def test_full_field_applies_local_then_affine():
    """Labels are warped by the local field, then by the affine (section 2.2): u = u_g + u_l(x + u_g)."""
    grid = adv.ModelFrame((8, 8, 8), 2.0, 0).canonical()
    local = torch.zeros(1, 3, 8, 8, 8)
    local[:, 0] = grid.points()[..., 1] * 0.1  # u_x = 0.1 y: varies along y
    affine = torch.zeros(1, 3, 4)
    affine[0, 1, 3] = 2.0  # translate y by 2 mm
    u = adv.full_field(local, affine, grid)
    inner = (slice(None), slice(None), slice(1, 6), slice(1, 6), slice(1, 6))
    expected_x = (grid.points()[..., 1] + 2.0) * 0.1
    assert torch.allclose(u[:, 0][inner[:1] + inner[2:]], expected_x[inner[2:]], atol=1e-5)
    assert torch.allclose(u[:, 1], torch.full_like(u[:, 1], 2.0), atol=1e-6)


def test_discriminator_loss_matches_the_paper_and_its_smoothing_term_is_positive():
    torch.manual_seed(0)
    disc = Discriminator((16, 16, 16), n0=2, depth=2)
    sim, pred = torch.randn(2, 3, 16, 16, 16), torch.randn(2, 3, 16, 16, 16)
    plain, _, _ = adv.discriminator_loss(disc, sim, pred, gamma=0.0)
    with torch.no_grad():
        real, fake = disc(sim), disc(pred)
    eq2 = -0.5 * torch.log(torch.sigmoid(real)).mean() - 0.5 * torch.log(1 - torch.sigmoid(fake)).mean()
    assert plain.item() == pytest.approx(eq2.item(), rel=1e-5)
    smoothed, _, _ = adv.discriminator_loss(disc, sim, pred, gamma=0.2)
    assert smoothed.item() > plain.item()
    gen = adv.generator_loss(disc, pred)
    assert gen.item() == pytest.approx((-0.5 * torch.log(torch.sigmoid(fake)).mean()).item(), rel=1e-5)


def _translation_model(path, frame: adv.ModelFrame, t_model) -> str:
    """A model whose network outputs exactly the translation `t_model` (model axes, mm)."""
    card = adv.model_card(frame, n0=2, depth=2, discriminator=False, init="centres", field_norm=None)
    net, _ = adv.build_networks(card)
    with torch.no_grad():
        for conv in net.summands:
            conv.weight.zero_()
        net.affine_fc.bias.copy_(torch.tensor([0, 0, 0, t_model[0], 0, 0, 0, t_model[1], 0, 0, 0, t_model[2]], dtype=torch.float32))
    return str(save_model(path, {f"generator.{k}": v for k, v in net.state_dict().items()}, card))


def test_inference_maps_model_frame_to_physical_space_on_oblique_grids(tmp_path):
    """Network output (model axes) + centring -> LPS mm on the fixed grid, with the fixed direction."""
    frame = adv.ModelFrame((16, 16, 16), 4.0, 2)
    t_model = np.array([3.0, -2.0, 1.5])
    model = _translation_model(tmp_path / "shift", frame, t_model)
    fixed, moving = fixed_volume(), moving_volume()
    moving = Volume(moving.array, moving.spacing, moving.origin + np.array([40.0, -12.0, 7.0]), moving.direction)
    result = adv.register_adversarial(fixed, moving, model=model, device="cpu")
    expected = Grid.of(moving).center - Grid.of(fixed).center + fixed.direction @ t_model
    u = result.field.array.reshape(3, -1)
    assert Grid.of(result.field).matches(fixed)
    assert np.abs(u - expected[:, None]).max() < 1e-4


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'iteration'"):
        load_config(None, iteration=3)
    with pytest.raises(ConfigError, match="unknown config key 'data.lables'"):
        load_config(None, data={"lables": "all"}, regularizer="none")
    with pytest.raises(ConfigError, match="needs 'simulations'"):
        load_config(None)
    assert load_config(None, regularizer="bending")["weight"] == 0.5
    # numbers that would train nothing, or away from the data, with no error: refused for every trainer, before any data is read
    for method in ("adversarial", "airnet", "symmetric", "deformgan", "glands", "segreg"):
        path = tmp_path / f"{method}.yaml"
        for key, value, message in (
            ("iterations", -3, "iterations must be a whole number, 0 or more; got -3"),
            ("batch_size", 0, "batch_size must be a whole number, 1 or more; got 0"),
            ("lr", -1.0, "lr must be a number above 0; got -1.0"),
            ("lr", "fast", "lr must be a number above 0; got 'fast'"),
        ):
            path.write_text(f"method: {method}\n{key}: {value}\n")
            with pytest.raises(ConfigError, match=re.escape(message)):
                load_config(path)
    path.write_text("method: segreg\nlr: 1e-4\nlr_final: 1e-5\n")  # YAML reads 1e-4 (no dot) as a string
    assert load_config(path)["lr"] == 1e-4 and load_config(path)["lr_final"] == 1e-5
    path.write_text("method: segreg\nlr_final: 0\n")  # the end of an exponential decay
    with pytest.raises(ConfigError, match="lr_final must be a number above 0; got 0"):
        load_config(path)
    path.write_text("method: symmetric\n")  # no lr_final: a constant rate
    assert load_config(path)["lr_final"] is None


@pytest.fixture
def tiny_config(tmp_path, shared_data, smooth_fields):
    config = {
        "iterations": 4,
        "batch_size": 2,
        "frame": {"shape": [16, 16, 16], "spacing": 6.0, "margin": 4},
        "network": {"n0": 2, "depth": 2},
        "simulations": str(smooth_fields(tmp_path / "sims")),
        "validate_every": 0,
        "checkpoint_every": 2,
        "log_every": 1,
        "data": {"limit": 3, "root": str(shared_data)},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _weights(folder):
    return load_file(folder / "adversarial_mrus.safetensors")


def test_resumed_training_equals_uninterrupted_training(tmp_path, tiny_config):
    straight = train(load_config(tiny_config), tmp_path / "straight")

    def killed_at_3(row, total):  # a kill after iteration 3 was logged, one after the checkpoint at 2
        if row["iteration"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(tiny_config), tmp_path / "resumed", progress=killed_at_3)
    assert not (tmp_path / "resumed" / "adversarial_mrus.safetensors").exists()
    resumed = train(load_config(tiny_config), tmp_path / "resumed")
    assert resumed["iteration"] == straight["iteration"] == 4
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log = (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == [1, 2, 3, 4]  # no lost or repeated rows
    card = json.loads((tmp_path / "resumed" / "adversarial_mrus.json").read_text())["training"]
    again = train(load_config(tiny_config), tmp_path / "resumed")  # finished: nothing to run, the card's figures kept
    assert again == resumed and json.loads((tmp_path / "resumed" / "adversarial_mrus.json").read_text())["training"] == card
    with pytest.raises(ConfigError, match="another config"):
        train(load_config(tiny_config, lr=1e-3), tmp_path / "resumed")


def _worker_errors(stderr: str) -> str:
    """The workers' own error lines, which torchrun's closing traceback pushes out of any tail."""
    marks = ("terminate", "what()", "Error", "error:", "Abort", "Fatal", "Segmentation", "Signal")
    lines = [line for line in stderr.splitlines() if any(m in line for m in marks) and "site-packages" not in line]
    return "\n".join(lines[:40]) + "\n...\n" + stderr[-800:]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_config):
    base = [sys.executable, "-m"]
    one = subprocess.run(
        [*base, "priorreg", "train", str(tiny_config), "--out", str(tmp_path / "one")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [*base, "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "priorreg", "train", str(tiny_config),
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert two.returncode == 0, _worker_errors(two.stderr)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    final = load_file(tmp_path / "one" / "checkpoint.safetensors")
    assert all(torch.equal(a[k], final[k]) for k in a)  # the last checkpoint holds the final weights
    # Summing two half-batch gradients rounds differently from one full-batch sum (~1e-7), and
    # Adam divides by the gradient's magnitude, so weights with ~0 gradient may step by up to lr
    # either way. Demand: the two runs differ by under 1% of how far training moved the weights.
    card = yaml.safe_load((tmp_path / "two" / "adversarial_mrus.json").read_text())
    torch.manual_seed(0)
    init = {f"{name}.{k}": v for name, net in zip(("generator", "discriminator"), adv.build_networks(card))
            for k, v in net.state_dict().items()}  # fmt: skip
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    moved = torch.cat([(a[k] - init[k]).flatten() for k in a]).norm()
    assert moved > 0 and diff < 0.01 * moved, (float(diff), float(moved))
    logs = [np.genfromtxt(tmp_path / run / "log.csv", delimiter=",", names=True) for run in ("one", "two")]
    np.testing.assert_allclose(logs[0]["label"], logs[1]["label"], rtol=1e-5)
    # the smoothing term squares input gradients of a barely trained discriminator: less stable
    np.testing.assert_allclose(logs[0]["discriminator"], logs[1]["discriminator"], rtol=5e-2)
    assert card["training"]["processes"] == 2 and card["training"]["iterations"] == 4


def test_finetuning_improves_the_shipped_model_on_a_held_out_pair_and_changes_no_weights(shared_data):
    """Test-time fine-tuning on a test patient's gland labels: better Dice; the model, on disk and in memory, unchanged."""
    import hashlib

    from priorreg.data import binary_channels, mrus_pairs, split_by_patient
    from priorreg.evaluate import pair_metrics
    from priorreg.models import resolve_model

    path = resolve_model("adversarial_mrus")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = adv.LoadedModel.load(path, "cpu")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    v = split_by_patient(mrus_pairs(shared_data))["test"][0].load()
    glands = [binary_channels(x).channel(0) for x in (v.fixed_labels, v.moving_labels)]
    plain = adv.register_adversarial(v.fixed, v.moving, loaded=model)
    seen = []
    tuned = adv.register_adversarial(
        v.fixed, v.moving, loaded=model, fixed_labels=glands[0], moving_labels=glands[1], finetune_steps=30, progress=seen.append
    )
    scores = [pair_metrics(r.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels) for r in (plain, tuned)]
    assert scores[1]["dice_mean"] > scores[0]["dice_mean"] + 0.02, scores
    assert scores[1]["folding_pct"] < 0.5
    assert [p.stage for p in seen] == ["fine-tune"] * 30 + ["inference"] and seen[-1].step == 31
    assert tuned.warped_labels is not None and tuned.method == "adversarial+finetune"
    assert all(torch.equal(before[k], w) for k, w in model.net.state_dict().items())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
