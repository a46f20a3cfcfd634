"""Registration through segmentation on the hippocampus: the segmenter's trainer, the shipped model on held-out subjects, bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from priorreg import data, metrics
from priorreg import train_segreg as ts
from priorreg.cli import main
from priorreg.evaluate import pair_metrics
from priorreg.jacobian import jacobian_stats
from priorreg.methods import METHODS
from priorreg.methods import segreg as sr
from priorreg.methods import symmetric as sym
from priorreg.models import available_models, load_model
from priorreg.registration import register
from priorreg.spatial import Grid, resample
from priorreg.train import load_config, train
from priorreg.volume import Volume

from .geometry import oblique

MODEL = "segreg_hippocampus"


@pytest.fixture(scope="module")
def shipped():
    if MODEL not in available_models():
        pytest.skip(f"no shipped {MODEL} model (train it: bench/configs/{MODEL}.yaml)")
    return sr.LoadedSegmenter.load(MODEL, device="cpu")


@pytest.fixture(scope="module")
def test_pairs(shared_data, shipped):
    """Pairs of test subjects: never seen by the segmenter (its card's split) nor by the symmetric network."""
    held_out = shipped.card["training"]["patients"]["test"]
    assert held_out == load_model("symmetric_hippocampus")[1]["training"]["patients"]["test"]
    return data.hippocampus_pairs(shared_data, subjects=held_out)[:4]


def test_the_shipped_segmenter_outlines_held_out_subjects_on_their_own_grids(shipped, test_pairs):
    for pair in test_pairs[:2]:
        v = pair.load()
        for image, truth in ((v.fixed, v.fixed_labels), (v.moving, v.moving_labels)):
            s = shipped.segment(image)
            assert Grid.of(s).matches(image) and s.array.shape == (2, *image.shape)
            assert set(np.unique(s.array)) <= {0.0, 1.0} and s.array.sum(0).max() == 1  # one class per voxel
            # when written: 0.90 to 0.91 on these four images (validation subjects: 0.87 mean)
            assert ts.label_dice(s, truth, shipped.labels) > 0.8, pair.id


def test_the_shipped_members_outline_better_together_than_alone(shipped, test_pairs):
    """The card's two networks (seeds 0 and 1), their probabilities averaged, against each alone on held-out images.

    When written, mean outline Dice over the 8 images: 0.893 together, 0.883 and 0.890 alone.
    """
    assert shipped.card["architecture"]["members"] == len(shipped.nets) == 2
    alone = [sr.LoadedSegmenter([net], shipped.card, shipped.device) for net in shipped.nets]
    dice = {"together": [], "member 0": [], "member 1": []}
    for pair in test_pairs:
        v = pair.load()
        for image, truth in ((v.fixed, v.fixed_labels), (v.moving, v.moving_labels)):
            for name, model in zip(dice, (shipped, *alone)):
                dice[name].append(ts.label_dice(model.segment(image), truth, shipped.labels))
    mean = {name: float(np.mean(values)) for name, values in dice.items()}
    assert mean["together"] > max(mean["member 0"], mean["member 1"]), mean


def test_the_outline_follows_the_image_not_its_header(shipped, test_pairs):
    v = test_pairs[0].load()
    moved = oblique([30, -20, 45], v.fixed.spacing, [80.0, -150.0, 25.0], v.fixed.shape, v.fixed.array)
    a, b = shipped.segment(v.fixed), shipped.segment(moved)
    assert np.allclose(b.direction, moved.direction) and np.allclose(b.origin, moved.origin)
    # the same voxels under another header: the same outline but for voxels on the frame's edges
    assert (a.array != b.array).mean() < 0.002


def test_registering_the_outlines_beats_the_symmetric_network_on_held_out_subjects(shipped, test_pairs):
    """When written, on these 4 pairs: Dice 0.81 (the network) -> 0.85, SDlogJ 0.17 -> 0.07, no folding."""
    assert METHODS["segreg"] is sr.register_segreg
    network = sym.LoadedSymmetric.load("symmetric_hippocampus", "cpu")
    rows = {"segreg": [], "symmetric": []}
    for pair in test_pairs:
        v = pair.load()
        ours = register(v.fixed, v.moving, "segreg", loaded=shipped)  # images only: no labels given
        assert ours.method == "segreg" and Grid.of(ours.field).matches(v.fixed)
        rows["segreg"].append(pair_metrics(ours.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels))
        field = register(v.fixed, v.moving, "symmetric", loaded=network).field
        rows["symmetric"].append(pair_metrics(field, v.fixed, v.moving, v.fixed_labels, v.moving_labels))
    mean = {name: {k: float(np.mean([r[k] for r in rs])) for k in ("dice_mean", "sdlogj", "folding_pct")} for name, rs in rows.items()}
    assert mean["segreg"]["dice_mean"] > mean["symmetric"]["dice_mean"] + 0.02, mean
    assert mean["segreg"]["sdlogj"] < mean["symmetric"]["sdlogj"] and mean["segreg"]["folding_pct"] == 0, mean


def test_the_lighter_smoothness_fits_the_outlines_tighter_and_still_never_folds(shipped, test_pairs):
    """segreg.SMOOTH_WEIGHT (0.1) against register_iterative's default 0.5, on a held-out pair's predicted outlines."""
    v = test_pairs[1].load()
    outlines = shipped.segment(v.fixed), shipped.segment(v.moving)
    fit, stats = {}, {}
    for weight in (sr.SMOOTH_WEIGHT, 0.5):
        field = register(v.fixed, v.moving, "segreg", loaded=shipped, smooth_weight=weight).field
        carried = resample(outlines[1], field, field).array
        fit[weight] = np.mean([metrics.dice(outlines[0].array[c], carried[c], labels=[1])[1] for c in range(len(carried))])
        stats[weight] = jacobian_stats(field)
    assert sr.SMOOTH_WEIGHT < 0.5 and fit[sr.SMOOTH_WEIGHT] > fit[0.5] + 0.005, fit
    assert stats[sr.SMOOTH_WEIGHT]["sdlogj"] > stats[0.5]["sdlogj"] and stats[sr.SMOOTH_WEIGHT]["folding_pct"] == 0, stats


def test_an_image_term_beside_the_outlines_roughens_the_field(shipped, test_pairs):
    """`image_weight` reaches the registration: the images' LNCC pulls where the outlines do not (segreg's comment on it)."""
    v = test_pairs[1].load()
    stats = {w: jacobian_stats(register(v.fixed, v.moving, "segreg", loaded=shipped, image_weight=w).field) for w in (0.0, 0.3)}
    assert stats[0.3]["sdlogj"] > 1.5 * stats[0.0]["sdlogj"], stats


def test_labels_the_user_gives_replace_the_prediction(shipped, test_pairs):
    v = test_pairs[0].load()
    predicted = register(v.fixed, v.moving, "segreg", loaded=shipped)
    expert = register(v.fixed, v.moving, "segreg", loaded=shipped, fixed_labels=v.fixed_labels, moving_labels=v.moving_labels)
    dice = {name: pair_metrics(r.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)["dice_mean"] for name, r in (("predicted", predicted), ("expert", expert))}
    assert dice["expert"] > dice["predicted"] and dice["expert"] > 0.85, dice  # the experts' outlines aligned: the method's bound
    channels = shipped.channels_of(v.moving_labels)
    assert np.array_equal(channels.array, np.stack([v.moving_labels.array == 1, v.moving_labels.array == 2]).astype(np.float32))
    assert np.array_equal(shipped.channels_of(channels).array, channels.array)  # 4D segments, as Slicer gives them, in the card's order
    with pytest.raises(ValueError, match="3 segments given, the model has 2"):
        shipped.channels_of(channels.with_array(np.concatenate([channels.array, channels.array[:1]])))
    with pytest.raises(ValueError, match="none of the model's labels"):
        shipped.channels_of(v.moving_labels.with_array(np.where(v.moving_labels.array > 0, 7, 0)))
    anterior_only = v.moving_labels.with_array(np.where(v.moving_labels.array == 1, 1, 0))
    with pytest.raises(ValueError, match="found in only one of the two images: posterior hippocampus"):
        register(v.fixed, v.moving, "segreg", loaded=shipped, moving_labels=anterior_only)


def test_images_without_the_anatomy_are_errors_not_identities(shipped, test_pairs, shared_data):
    v = test_pairs[0].load()
    with pytest.raises(ValueError, match="constant image"):
        register(v.fixed.with_array(np.zeros_like(v.fixed.array)), v.moving, "segreg", loaded=shipped)
    with pytest.raises(ValueError, match="3D image"):
        shipped.segment(Volume(np.zeros((2, 4, 4, 4), np.float32)))
    lung_ct = Volume.read(shared_data / "lung_ct" / "3DCT_lung.mha")  # a lung CT: no hippocampus anywhere
    with pytest.raises(ValueError, match="found in the moving image|found in only one"):
        register(v.fixed, lung_ct, "segreg", loaded=shipped)


def test_trainer_writes_a_model_the_method_loads(tmp_path, shared_data):
    config = {
        "name": "segreg_tiny", "method": "segreg", "iterations": 3, "batch_size": 2, "validate_every": 3,
        "data": {"root": str(shared_data), "limit": 3, "val_fraction": 0.02},
        "frame": {"shape": [24, 28, 20], "spacing": 2.0, "margin": 0}, "network": {"channels": [4, 8]},
    }  # fmt: skip
    path = tmp_path / "segreg.yaml"
    path.write_text(yaml.safe_dump(config))
    last = train(load_config(path), tmp_path / "run")
    assert last["iteration"] == 3 and 0 <= last["val_dice"] <= 1 and last["cross_entropy"] > 0
    card = json.loads((tmp_path / "run" / "segreg_tiny.json").read_text())
    assert card["method"] == "segreg" and card["labels"] == {"1": "anterior hippocampus", "2": "posterior hippocampus"}
    assert card["frame"] == {"shape": [24, 28, 20], "spacing": 2.0} and card["architecture"]["channels"] == [4, 8]
    assert len(card["training"]["train_pairs"]) == 3 and set(card["training"]["patients"]) == {"train", "val", "test"}
    loaded = sr.LoadedSegmenter.load(tmp_path / "run" / "segreg_tiny.safetensors", device="cpu")
    image = Volume.read(data.hippocampus_files("001", shared_data)[0])
    assert loaded.segment(image).array.shape == (2, *image.shape)
    with pytest.raises(ValueError, match="model, not a 'segreg' one"):
        sr.LoadedSegmenter.load("symmetric_hippocampus")
    path.write_text(yaml.safe_dump({**config, "data": {"task": "mrus_prostate"}}))
    with pytest.raises(ValueError, match="segmenter trainer knows 'hippocampus'"):
        load_config(path)


def test_members_train_from_their_own_seeds_and_load_as_one_averaged_model(tmp_path, shared_data):
    config = {
        "name": "segreg_pair", "method": "segreg", "iterations": 2, "batch_size": 2, "validate_every": 2, "members": 2,
        "data": {"root": str(shared_data), "limit": 3, "val_fraction": 0.02},
        "frame": {"shape": [24, 28, 20], "spacing": 2.0, "margin": 0}, "network": {"channels": [4, 8]},
    }  # fmt: skip
    path = tmp_path / "segreg.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    last = train(load_config(path), run)
    card = json.loads((run / "segreg_pair.json").read_text())
    assert card["architecture"]["members"] == 2 and [m["seed"] for m in card["training"]["members"]] == [0, 1]
    assert card["training"]["final_log"]["val_dice"] == last["val_dice"] and 0 <= last["val_dice"] <= 1
    assert [r["member"] for r in csv.DictReader((run / "log.csv").open())] == ["0", "1", "ensemble"]
    ensemble = sr.LoadedSegmenter.load(run / "segreg_pair.safetensors", device="cpu")
    members = [sr.LoadedSegmenter.load(run / f"member{k}" / f"segreg_pair_member{k}.safetensors", device="cpu") for k in (0, 1)]
    assert len(ensemble.nets) == 2 and all(len(m.nets) == 1 for m in members)
    for a, b in zip(members, ensemble.nets):  # each member's own weights, not one network twice
        assert all(torch.equal(x, y) for x, y in zip(a.nets[0].state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(*(n.state_dict().values() for n in ensemble.nets)))
    image = Volume.read(data.hippocampus_files("001", shared_data)[0])
    a, b, both = (m.segment(image).array for m in (*members, ensemble))
    agree = (a == b).all(0)
    assert np.array_equal(both[:, agree], a[:, agree])  # averaged probabilities keep every voxel the members agree on
    ensemble.nets = [ensemble.nets[0]] * 2  # an ensemble of one network twice outlines as that network
    assert np.array_equal(ensemble.segment(image).array, a)
    logged = (run / "member0" / "log.csv").read_text()
    assert train(load_config(path), run)["val_dice"] == last["val_dice"]  # finished members are reused, not retrained
    assert (run / "member0" / "log.csv").read_text() == logged
    assert json.loads((run / "segreg_pair.json").read_text())["training"]["members"] == card["training"]["members"]
    path.write_text(yaml.safe_dump({**config, "members": 0}))
    with pytest.raises(ValueError, match="members must be a whole number, 1 or more"):
        load_config(path)


def test_the_segmentation_loss_is_lowest_for_the_right_labels():
    truth = torch.zeros(1, 2, 8, 8, 8)
    truth[0, 0, :4], truth[0, 1, 4:6] = 1, 1
    right = torch.cat([(1 - truth.sum(1, keepdim=True)), truth], 1) * 20 - 10  # confident logits of the truth
    wrong = right[:, [0, 2, 1]]  # the two structures swapped
    assert ts.segmentation_loss(right, truth)[0] < 0.01 < ts.segmentation_loss(wrong, truth)[0]


def test_register_and_evaluate_from_the_command_line(tmp_path, shared_data, shipped, test_pairs):
    pair = test_pairs[0]
    assert main(["register", "--fixed", str(pair.fixed), "--moving", str(pair.moving), "--method", "segreg", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["method"] == "segreg" and report["options"]["model"] == MODEL
    out = tmp_path / "eval.json"
    args = ["--data-root", str(shared_data), "evaluate", "--task", "hippocampus", "--split", "test", "--pairs", "1", "--device", "cpu"]
    assert main([*args, "--method", "segreg", "--json", str(out)]) == 0
    predicted = json.loads(out.read_text())["summary"]["dice_mean"]
    assert predicted > 0.7
    # the expert label map of the moving image in place of its outline (an integer map is taken whole), the fixed one predicted
    assert main([*args, "--method", "segreg", "--label-channels", "0", "--label-roles", "moving", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["label_roles"] == ["moving"] and report["summary"]["dice_mean"] != predicted
