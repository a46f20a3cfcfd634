"""Deform-GAN (seed 002): geometry of T's field, training by turns, the loss weights, a tiny real run.

The geometry test needs no data: T is set to output one constant model-frame vector, which must
come back on the fixed grid (anisotropic, oblique, off-origin) as that vector turned by the fixed
direction, plus the centring shift; with the affine initialisation, the moving image T sees and the
field are checked against a known oblique affine. The rest train on the shared brain sets at a tiny frame.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from priorreg import known_deformations as kd
from priorreg.cli import main
from priorreg.known_deformations import rotation_matrix
from priorreg.methods import METHODS
from priorreg.methods import deformgan as dg
from priorreg.methods.adversarial import ModelFrame
from priorreg.methods.baselines import register_affine
from priorreg.spatial import Grid
from priorreg.train import load_config, train
from priorreg.train_deformgan import DEFAULTS, DeformGANTrainer, draw_batch
from priorreg.volume import Volume

TINY = {
    "method": "deformgan",
    "name": "deformgan_tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"val_pairs": 0},
    "frame": {"shape": [10, 14, 14], "spacing": 16.0, "margin": 2},
    "network": {"transform": [4, 8], "generator": [4, 8], "discriminator": [4, 8], "output_scale_mm": 10.0},
    "iterations": 4,
    "lr": 1e-3,
    "checkpoint_every": 2,
    "validate_every": 0,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, shared_data, **changes) -> dict:
    path = tmp_path / "tiny.yaml"
    given = {**TINY, **changes}
    path.write_text(yaml.safe_dump(given))
    config = load_config(path)
    config["data"]["root"] = str(shared_data)
    return config


def card_for(frame: ModelFrame, gan: bool = True) -> dict:
    return dg.model_card(frame, {"transform": [4, 8], "generator": [4, 8], "discriminator": [4, 8], "output_scale_mm": 10.0}, gan)


def constant_transform(card: dict, vector_mm) -> torch.nn.Module:
    """T whose output is `vector_mm` (model x, y, z) everywhere: zero weights, the bias set."""
    net = dg.build_networks(card)["transform"]
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.copy_(torch.as_tensor(vector_mm, dtype=torch.float32) / card["architecture"]["output_scale_mm"])
    return net.eval()


# ------------------------------------------------------------------------------------- geometry
def test_field_is_in_lps_mm_on_an_anisotropic_oblique_fixed_grid():
    direction = rotation_matrix([1.0, 2.0, 0.5], 25.0)
    fixed = Volume(np.random.default_rng(0).random((9, 20, 16), dtype=np.float32), (1.2, 0.9, 4.0), (-30.0, 12.0, 7.5), direction)
    moving = Volume(fixed.array.copy(), fixed.spacing, fixed.origin + np.array([3.0, -2.0, 5.0]), direction)
    frame = ModelFrame((8, 12, 10), 3.0, 2)
    card = card_for(frame)
    d = np.array([2.0, -1.5, 4.0])
    loaded = dg.LoadedDeformGAN(constant_transform(card, d), card, "cpu")

    result = dg.register_deformgan(fixed, moving, loaded=loaded, init="centres")
    field = result.field
    assert field.array.shape == (3, 9, 20, 16) and Grid.of(field).matches(fixed)
    expected = direction @ d + (Grid.of(moving).center - Grid.of(fixed).center)
    np.testing.assert_allclose(field.array.reshape(3, -1).T, np.broadcast_to(expected, (9 * 20 * 16, 3)), atol=1e-4)
    assert result.method == "deformgan" and Grid.of(result.warped).matches(fixed)
    # with trusted headers the centring shift is gone: the vector alone, turned by the direction
    geometry = dg.register_deformgan(fixed, moving, loaded=loaded, init="geometry").field
    np.testing.assert_allclose(geometry.array[:, 4, 10, 8], direction @ d, atol=1e-4)


class Recording(torch.nn.Module):
    """T's stand-in for one test: records its input (the framed pair) and outputs a constant model vector."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, pair):
        self.inputs.append(pair)
        return self.net(pair)


def test_affine_init_frames_the_moving_image_through_the_affine_and_composes_t_after_it(monkeypatch):
    """`init: affine`: T sees the moving image through `p -> A p + t`, and the field is `x -> A (x + r(x)) + t`.

    The moving image is a smooth pattern `g` carried by a known oblique affine (`moving(A p + t) = g(p) = fixed(p)`),
    the affine step is set to return that affine, so T's two input channels must show the same image; T outputs
    one model vector `d`, so `r = R d` (R the fixed direction) and the field is known in closed form.
    """
    direction = rotation_matrix([0.3, -1.0, 0.6], 20.0)
    a = rotation_matrix([1.0, 0.2, -0.4], 8.0) @ np.diag([1.05, 0.95, 1.02])
    t = np.array([4.0, -3.0, 6.0])
    affine = np.c_[a, t]

    def pattern(p):  # smooth: linear interpolation onto a 4 mm frame is nearly exact
        return np.sin(p[..., 0] / 9.0) * np.cos(p[..., 1] / 11.0) + 0.5 * np.sin(p[..., 2] / 7.0)

    fixed_grid = Grid((14, 40, 36), np.array([1.1, 1.3, 3.0]), np.array([-22.0, -30.0, -20.0]), direction)
    fixed = Volume(pattern(fixed_grid.physical_points()).astype(np.float32), fixed_grid.spacing, fixed_grid.origin, direction)
    # the moving image on its own (axis-aligned, finer, larger) grid: moving(q) = g(A^-1 (q - t))
    moving_grid = Grid((60, 90, 90), np.array([1.0, 1.0, 1.5]), fixed_grid.center - 45.0, np.eye(3))
    q = moving_grid.physical_points()
    moving = Volume(pattern((q - t) @ np.linalg.inv(a).T).astype(np.float32), moving_grid.spacing, moving_grid.origin, np.eye(3))
    monkeypatch.setattr(dg, "mutual_information_affine", lambda f, m: affine)

    frame = ModelFrame((8, 12, 12), 4.0, 2)
    card = card_for(frame)
    d = np.array([1.5, -2.0, 0.5])
    recording = Recording(constant_transform(card, d))
    result = dg.register_deformgan(fixed, moving, loaded=dg.LoadedDeformGAN(recording, card, "cpu"), init="affine")

    (pair,) = recording.inputs
    f, m = pair[0, 0], pair[0, 1]
    # the frame voxels well inside the fixed field of view (each image is scaled by its own percentiles: correlate)
    inside = -torch.nn.functional.max_pool3d(-(f != 0).float()[None, None], 3, 1, 1)[0, 0] > 0
    assert inside.float().mean() > 0.3
    assert np.corrcoef(f[inside], m[inside])[0, 1] > 0.99, "T must see the moving image carried back through the affine"
    x = fixed_grid.physical_points()
    expected = (x + direction @ d) @ a.T + t - x
    np.testing.assert_allclose(np.moveaxis(result.field.array, 0, -1), expected, atol=1e-3)
    assert [h["stage"] for h in result.history] == ["affine", "inference"]


def test_transform_net_starts_at_identity_and_keeps_odd_frame_sizes():
    frame = ModelFrame((9, 13, 11), 4.0, 0)
    nets = dg.build_networks(card_for(frame))
    pair = torch.rand(2, 1, 9, 13, 11)
    u = dg.displacement(nets["transform"], pair, pair.flip(0), 10.0)
    assert u.shape == (2, 3, 9, 13, 11) and torch.count_nonzero(u) == 0
    assert nets["generator"](pair).shape == pair.shape
    assert nets["discriminator"](pair, pair).shape[:2] == (2, 1)
    assert "generator" not in dg.build_networks(card_for(frame, gan=False))
    assert METHODS["deformgan"] is dg.register_deformgan


# ---------------------------------------------------------------------------------------- losses
class ConstantDisc(torch.nn.Module):
    def __init__(self, logit: float):
        super().__init__()
        self.logit = logit

    def forward(self, condition, image):
        return torch.full_like(image[:, :1, ::2, ::2, ::2], self.logit)


def test_loss_terms_have_the_papers_weights():
    assert dg.WEIGHTS == {"alpha": 1.0, "beta": 2.0, "mu": 5.0, "lambda": 100.0} and dg.WINDOW == 7
    assert DEFAULTS["loss"]["weights"] == dg.WEIGHTS and DEFAULTS["loss"]["window"] == 7 and DEFAULTS["loss"]["gan"] is True
    g = torch.Generator().manual_seed(0)
    grid = ModelFrame((12, 14, 16), 2.0, 0).canonical()
    fixed, warped, synth = (torch.rand(1, 1, 12, 14, 16, generator=g) for _ in range(3))
    u = torch.randn(1, 3, 12, 14, 16, generator=g)
    lg = dg.losses.local_gradient(fixed, warped, grid, 7)
    cc = dg.losses.lncc(fixed, synth, 7)
    smooth = dg.regularizers.gradient_l2(u, grid)
    total, parts = dg.transform_loss(fixed, warped, synth, u, grid)
    assert total.item() == pytest.approx((cc + 2 * lg + 1 * smooth).item(), rel=1e-6)
    assert parts["lncc"] == pytest.approx(cc.item()) and parts["similarity"] == pytest.approx(lg.item())
    # VoxelMorph-LG: no G, so no LCC term
    vm, vm_parts = dg.transform_loss(fixed, warped, None, u, grid)
    assert vm.item() == pytest.approx((2 * lg + smooth).item(), rel=1e-6) and "lncc" not in vm_parts
    # loss.similarity lncc: the direct term is LNCC of the fixed and the warped image, still weighted by beta
    direct, direct_parts = dg.transform_loss(fixed, warped, None, u, grid, similarity="lncc")
    assert direct.item() == pytest.approx((2 * dg.losses.lncc(fixed, warped, 7) + smooth).item(), rel=1e-6)
    assert direct_parts["similarity"] < 0 < parts["similarity"]  # LNCC is a negative correlation, the local gradient loss a distance
    # eq. 8: GAN + mu LG(G(F(phi)), F(phi)) + lambda L1(G(F(phi)), R); D(.) = 0 logits: GAN = log 2
    g_total, g_parts = dg.generator_loss(ConstantDisc(0.0), warped, synth, fixed, grid)
    expected = np.log(2) + 5 * dg.losses.local_gradient(synth, warped, grid, 7).item() + 100 * (synth - fixed).abs().mean().item()
    assert g_total.item() == pytest.approx(expected, rel=1e-5) and g_parts["g_gan"] == pytest.approx(np.log(2))
    d_total, d_parts = dg.discriminator_loss(ConstantDisc(0.0), warped, synth, fixed)
    assert d_total.item() == pytest.approx(np.log(2)) and d_parts["d_real"] == pytest.approx(0.5)
    assert dg.discriminator_loss(ConstantDisc(5.0), warped, synth, fixed)[0].item() > 2  # confident "real" on fakes costs


# -------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trainer(shared_data, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("config"), shared_data)
    return DeformGANTrainer(config, tmp_path_factory.mktemp("turns"))


def snapshot(trainer) -> dict:
    return {name: [p.detach().clone() for p in m.parameters()] for name, m in trainer.modules.items()}


def changed(before: dict, after: dict) -> set:
    return {name for name in before if any(not torch.equal(a, b) for a, b in zip(before[name], after[name]))}


def test_each_network_changes_only_in_its_own_turn(trainer):
    assert trainer.data.ids == list(kd.SPLIT["train"])
    batch = trainer.batch(draw_batch(trainer.config, 0, len(trainer.data)))
    assert batch["fixed"].shape == batch["moving"].shape == (1, 1, 10, 14, 14)
    assert batch["moving_big"].shape == (1, 1, 14, 18, 18) and batch["true_field"].shape == (1, 3, 10, 14, 14)

    before = snapshot(trainer)
    _, warped, parts = trainer.transform_turn(batch)
    assert changed(before, snapshot(trainer)) == {"transform"} and "lncc" in parts
    assert all(p.grad is None for name in ("generator", "discriminator") for p in trainer.modules[name].parameters())

    before = snapshot(trainer)
    synthesized, _ = trainer.generator_turn(batch, warped)
    assert changed(before, snapshot(trainer)) == {"generator"}
    assert all(p.grad is None for p in trainer.modules["discriminator"].parameters())

    before = snapshot(trainer)
    trainer.discriminator_turn(batch, warped, synthesized)
    assert changed(before, snapshot(trainer)) == {"discriminator"}


def test_t_alone_lowers_its_loss_on_one_known_deformation(shared_data, tmp_path):
    config = tiny_config(tmp_path, shared_data, loss={"gan": False}, lr=3e-3)
    vm = DeformGANTrainer(config, tmp_path / "vm")
    assert set(vm.modules) == {"transform"}
    batch = vm.batch(draw_batch(config, 0, len(vm.data)))
    first = vm.transform_turn(batch)[2]["loss"]
    for _ in range(15):
        last = vm.transform_turn(batch)[2]["loss"]
    # An absolute drop: the local gradient loss is 1 on flat voxels (no edge to align), a floor that a ratio would count.
    assert np.isfinite(last) and last < first - 0.03, (first, last)


@pytest.fixture(scope="module")
def tiny_model(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(out, shared_data)
    last = train(config, out)
    return out / "deformgan_tiny.safetensors", last


def test_a_tiny_run_saves_a_model_that_registers(tiny_model):
    path, last = tiny_model
    assert last["iteration"] == 4 and np.isfinite(last["loss"]) and np.isfinite(last["g_loss"])
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["method"] == "deformgan" and card["gan"] is True
    assert card["training"]["split"] == {k: list(v) for k, v in kd.SPLIT.items()}
    assert card["training"]["train_sets"] == list(kd.SPLIT["train"])
    assert (path.parent / "log.csv").exists() and (path.parent / "checkpoint.safetensors").exists()
    fixed = Volume(np.random.default_rng(1).random((8, 30, 26), dtype=np.float32), (0.9, 0.9, 6.5), (10.0, -20.0, 0.0), np.eye(3))
    field = dg.register_deformgan(fixed, fixed, model=path, device="cpu").field
    assert Grid.of(field).matches(fixed) and np.isfinite(field.array).all()


def test_evaluate_scores_the_tiny_model_on_the_held_back_set(tiny_model, shared_data, tmp_path):
    path, _ = tiny_model
    out = tmp_path / "report.json"
    args = ["--data-root", str(shared_data), "evaluate", "--task", "brain_t1t2", "--split", "test"]
    assert main([*args, "--method", "deformgan", "--model", str(path), "--device", "cpu", "--pairs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["pairs"]
    assert row["id"].startswith(kd.SPLIT["test"][0]) and report["model"] == str(path) and report["split"] == "test"
    assert np.isfinite(row["epe_mm"]) and np.isfinite(row["rmse"]) and row["seconds"] > 0


def test_mutual_information_affine_recovers_a_known_affine_and_an_untrained_t_adds_nothing(shared_data):
    """On a held-back T1 -> T2 pair deformed by a known affine alone, the MI affine lands within a millimetre,
    and Deform-GAN with `init: affine` and T still at zero is that affine, to the micrometre."""
    pairs = kd.known_deformation_pairs(shared_data, n=1, max_voxels=120_000, magnitudes=kd.Magnitudes(elastic_mm=0.0))
    pair = next(p for p in pairs if p.group in kd.SPLIT["test"])
    assert pair.id.endswith("T1pre_to_T2_0")
    v = pair.load()
    start = kd.end_point_error(v.true_field.with_array(0 * v.true_field.array), v.true_field, v.mask)["epe_mm"]
    affine = register_affine(v.fixed, v.moving).field
    epe = kd.end_point_error(affine, v.true_field, v.mask)
    assert start > 5 and epe["epe_mm"] < 1.0, (start, epe)
    frame = ModelFrame((8, 12, 12), 16.0, 2)
    card = dg.model_card(frame, {"transform": [4, 8], "generator": [4, 8], "discriminator": [4, 8], "output_scale_mm": 5.0}, False, "affine")
    untrained = dg.LoadedDeformGAN(dg.build_networks(card)["transform"].eval(), card, "cpu")
    field = dg.register_deformgan(v.fixed, v.moving, loaded=untrained).field
    np.testing.assert_allclose(field.array, affine.array, atol=0.05)


def test_finetuning_the_shipped_model_on_a_held_back_pair_lowers_its_error_and_changes_no_weights(shared_data):
    """Test-time fine-tuning of T on a held-back pair's images (no labels): a lower end-point error than one
    pass, still no folding; the shipped model, on disk and in memory, unchanged."""
    import hashlib

    from priorreg.evaluate import TASKS
    from priorreg.jacobian import jacobian_stats
    from priorreg.models import resolve_model

    path = resolve_model("deformgan_brain")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = dg.LoadedDeformGAN.load(path, "cpu")
    before = {k: w.clone() for k, w in model.transform.state_dict().items()}
    pair = next(p for p in TASKS["brain_t1t2"][0](shared_data, 1, 0) if p.group in kd.SPLIT["test"])
    v = pair.load()
    plain = dg.register_deformgan(v.fixed, v.moving, loaded=model)
    seen = []
    tuned = dg.register_deformgan(v.fixed, v.moving, loaded=model, finetune_steps=30, progress=seen.append)
    plain_epe, tuned_epe = (kd.end_point_error(r.field, v.true_field, v.mask)["epe_mm"] for r in (plain, tuned))
    assert tuned_epe < plain_epe - 0.2, (plain_epe, tuned_epe)
    assert tuned.method == "deformgan+finetune" and jacobian_stats(tuned.field)["folding_pct"] == 0
    assert [p.stage for p in seen] == ["affine"] + ["fine-tune"] * 30 + ["inference"]
    assert all(torch.equal(before[k], w) for k, w in model.transform.state_dict().items())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_finetuning_refuses_labels_and_a_similarity_t_was_not_trained_for(shared_data, capsys, tmp_path):
    """Deform-GAN fine-tunes on its own training loss: other similarities and labels are one clear line, before any work."""
    fixed = Volume(np.zeros((8, 8, 8), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(ValueError, match="local_gradient, lncc"):
        dg.register_deformgan(fixed, fixed, model="no such model", finetune_steps=3, similarity="mse")
    base = ["--data-root", str(shared_data), "register", "--sample", "mrus", "--method", "deformgan", "--finetune-steps", "3"]
    assert main([*base, "--label-channels", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "fine-tunes on the images alone" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
