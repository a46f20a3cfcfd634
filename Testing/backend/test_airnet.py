"""Seed 001 (AIR-net): transforms, networks, reference alignments, known-error samples, trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from priorreg import data, metrics, reference
from priorreg.evaluate import pair_metrics
from priorreg.methods import airnet as air
from priorreg.methods.adversarial import ModelFrame
from priorreg.nets.airnet import AirNet
from priorreg.quality import known_error_samples, perturbed_field
from priorreg.registration import register
from priorreg.train import load_config, train
from priorreg.train_airnet import FramedPairs


def test_transforms_invert_and_compose():
    g = torch.Generator().manual_seed(0)
    params = air.random_perturbations(g, 64, "rigid", 25.0, 5.0)
    assert params[:, :3].abs().max() <= 25.0 and params[:, 3:].abs().max() <= 5.0
    m = air.transform_matrix(params, "rigid")
    rot = m[:, :, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(64), atol=1e-5)
    identity = air.then(m, air.invert(m))
    assert torch.allclose(identity, torch.eye(3, 4).expand(64, 3, 4), atol=1e-4)
    # the affine parameterisation of the same perturbations is the same map
    affine = air.random_perturbations(torch.Generator().manual_seed(0), 64, "affine", 25.0, 5.0)
    assert torch.allclose(air.transform_matrix(affine, "affine"), m, atol=1e-5)
    # 90 degrees about z sends x to y
    q = air.transform_matrix(torch.tensor([[0.0, 0.0, 90.0, 0.0, 0.0, 0.0]]), "rigid")
    assert torch.allclose(q[0, :, :3] @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("dims", [3, 2])
def test_networks_have_the_papers_outputs_and_the_generator_starts_at_identity(dims):
    shape = (24, 32, 24)
    card = {"architecture": {"width": 8, "dims": dims, "transform": "rigid"}, "frame": {"shape": list(shape)}}
    generator, critic = air.build_networks(card)
    f, w = torch.randn(2, 1, *shape), torch.randn(2, 1, *shape)
    assert generator(f, w).shape == (2, 6) and generator(f, w).abs().max() == 0
    assert critic(f, w).shape == (2, 1)
    assert AirNet(shape, 12, 8, dims)(f, w).shape == (2, 12)
    first = critic.features[0]
    assert first.dilation[0] == 2 and first.in_channels == (2 if dims == 3 else 48)


def test_standardise_and_critic_losses():
    x = torch.rand(3, 1, 4, 5, 6) * 50 + 7
    s = air.standardise(x)
    assert torch.allclose(s.flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.flatten(1).std(1), torch.ones(3), atol=1e-4)
    assert air.standardise(torch.full((1, 1, 3, 3, 3), 9.0)).abs().max() == 0  # constant -> zeros, no NaN
    critic = AirNet((8, 8, 8), 1, 4)
    real = (torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8))
    fake = (torch.randn(3, 1, 8, 8, 8), torch.randn(3, 1, 8, 8, 8))
    plain, d_real, d_fake = air.critic_loss(critic, real, fake, "clip")
    assert d_real.shape == (2,) and d_fake.shape == (3,)
    assert plain.item() == pytest.approx((d_fake.mean() - d_real.mean()).item(), abs=1e-6)
    penalised, _, _ = air.critic_loss(critic, real, fake, "gp")
    assert penalised.item() > plain.item()  # the penalty is non-negative and almost surely positive
    everywhere, _, _ = air.critic_loss(critic, real, fake, "gp", gp_fakes="all")
    assert everywhere.item() > plain.item()
    tre = torch.tensor([1.0, 4.0, float("nan")])
    assert air.error_regression_loss(torch.tensor([-1.0, -2.0, 5.0]), tre).item() == pytest.approx(2.0)  # (0 + 4) / 2
    # ranking: the worse-aligned sample must score lower; errors within the margin are not ordered
    tre = torch.tensor([0.5, 3.0, 9.0, 9.5, float("nan")])
    right, wrong = torch.tensor([2.0, 0.0, -3.0, 5.0, 0.0]), torch.tensor([-3.0, 0.0, 2.0, 5.0, 0.0])
    assert air.ranking_loss(right, tre) < air.ranking_loss(wrong, tre)
    # the pairs over 1 mm apart: (3.0, 0.5), (9.0, 0.5), (9.0, 3.0), (9.5, 0.5), (9.5, 3.0); not (9.5, 9.0)
    pairs = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]
    expected = sum(torch.nn.functional.softplus(right[i] - right[j]) for i, j in pairs) / len(pairs)
    assert air.ranking_loss(right, tre).item() == pytest.approx(expected.item())
    assert air.ranking_loss(right, torch.tensor([2.0, 2.5, 2.2, 2.9, 2.1])).item() == 0  # all within the margin
    air.clip_weights(critic, 0.01)
    assert max(p.abs().max().item() for p in critic.parameters()) <= 0.01


def test_framed_pairs_carry_gland_points_whose_error_is_the_alignments_move(shared_data):
    """The gland error of the reference alignment is 0, and of a perturbation the RMS move of the gland points."""
    pairs = data.split_by_patient(data.mrus_pairs(shared_data))["train"][:2]
    frame = ModelFrame((24, 32, 24), 3.0, 8)
    framed = FramedPairs(pairs, frame, "centres")
    fgrid = frame.canonical()
    shift = torch.tensor([[[1.0, 0, 0, 3.0], [0, 1.0, 0, 0], [0, 0, 1.0, 4.0]]])  # a 5 mm translation in the frame
    for i in range(2):
        points, mapped = framed.gland[i]
        assert 50 < len(points) <= 256
        assert air.candidate_tre(framed.ref[i : i + 1], torch.eye(3, 4)[None], fgrid, points, mapped).item() == pytest.approx(0, abs=1e-4)
        moved = air.candidate_tre(framed.ref[i : i + 1], shift, fgrid, points, mapped).item()
        assert 3.5 < moved < 6.5  # the reference field is smooth: about the 5 mm shift


@pytest.fixture(scope="module")
def mrus_pair(shared_data):
    return data.mrus_pairs(shared_data)[0]


def test_reference_alignment_fits_the_labels_without_folding(mrus_pair):
    """The label-driven reference leaves about 1 mm landmark error, high gland overlap, no folding."""
    v = mrus_pair.load()
    frame = ModelFrame()
    ref = reference.fit_reference(v.fixed, v.moving, v.fixed_labels, v.moving_labels, frame)
    field = reference.reference_field(v.fixed, v.moving, ref, frame, "centres")
    m = pair_metrics(field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)
    centred = register(v.fixed, v.moving, method="centres").field
    before = pair_metrics(centred, v.fixed, v.moving, v.fixed_labels, v.moving_labels)
    assert m["tre_rms_mm"] < 1.5 < before["tre_rms_mm"]
    assert m["dice_mean"] > 0.85 > before["dice_mean"]
    assert m["folding_pct"] < 0.05


def test_known_error_samples_have_the_tre_the_frame_predicts(mrus_pair):
    """The Volume path (fields on the fixed grid, TRE from the labels) agrees with the model-frame path."""
    v = mrus_pair.load()
    frame = ModelFrame()
    ref = reference.cached_reference(mrus_pair, frame, "centres")
    ref_field = reference.reference_field(v.fixed, v.moving, ref, frame, "centres")
    g = torch.Generator().manual_seed(3)
    matrices = air.transform_matrix(air.random_perturbations(g, 4, "rigid", 25.0, 5.0), "rigid")
    in_frame = air.candidate_tre(ref.field, matrices, frame.canonical(), ref.fixed_points, ref.moving_points)
    for matrix, expected in zip(matrices, in_frame):
        field = perturbed_field(v.fixed, v.moving, ref_field, matrix, frame, "centres")
        tre = metrics.landmark_tre(field, v.fixed_labels, v.moving_labels)["rms"]
        assert tre == pytest.approx(float(expected), abs=0.3)
    assert float(in_frame.max()) > 2.0  # the perturbations really misalign


@pytest.mark.parametrize(
    "critic",
    [
        {"mode": "clip", "tre_weight": 1.0, "rank_weight": 1.0},  # Wasserstein (clipped) + both of PriorReg's terms, landmarks
        {"mode": "gp", "wasserstein": False, "tre_weight": 1.0, "target": "gland"},  # the critic as a gland-error regressor
    ],
    ids=["wasserstein_clip", "gland_regression"],
)
def test_a_short_training_run_writes_a_calibrated_model(tmp_path, shared_data, critic):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "method": "airnet",
                "name": "tiny",
                "data": {"root": str(shared_data), "limit": 3},
                "network": {"width": 4},
                "critic": critic,
                "iterations": 3,
                "batch_size": 2,
                "validate_every": 3,
                "checkpoint_every": 3,
                "calibration": {"per_pair": 3},
            }
        )
    )
    config = load_config(config_path)
    last = train(config, tmp_path / "run")
    assert np.isfinite(last["critic"]) and np.isfinite(last["val_tre_before_mm"]) and last["tre_fit"] > 0
    assert (last["rank_fit"] > 0) == ("rank_weight" in critic)
    if not critic.get("wasserstein", True):  # the critic's loss is the regression alone
        assert last["critic"] == pytest.approx(last["tre_fit"], rel=1e-5)
    card = json.loads((tmp_path / "run" / "tiny.json").read_text())
    cal = card["calibration"]
    assert len(cal["score"]) == 9 and np.all(np.diff(cal["tre_mm"]) <= 1e-9)  # 3 pairs x 3, non-increasing
    assert "gland_calibration" not in card  # the blend with the glands' misfit is opt-in (priorreg calibrate --glands)
    loaded = air.LoadedAirNet.load(tmp_path / "run" / "tiny.safetensors", "cpu")
    clipped = max(p.abs().max().item() for p in loaded.critic.parameters()) <= 0.01
    assert clipped == (critic["mode"] == "clip")  # a regression critic is never clipped


def test_known_error_samples_are_reproducible(mrus_pair, tmp_path):
    model = air.LoadedAirNet(*air.build_networks(_card()), _card(), "cpu")
    a = [s[3] for s in known_error_samples(mrus_pair, model, 2, seed=5)]
    b = [s[3] for s in known_error_samples(mrus_pair, model, 2, seed=5)]
    assert a == b and a[0] != a[1]


def _card():
    return air.model_card(ModelFrame(), 4, 3, "rigid", "centres", {"rotation_deg": 25.0, "translation_mm": 5.0})
