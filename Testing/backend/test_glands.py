"""MR-US registration through predicted glands: the segmenters' geometry, their trainer, the shipped model on held-out patients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from priorreg import data, metrics
from priorreg import train_glands as tg
from priorreg.cli import main
from priorreg.evaluate import evaluate_task, pair_metrics
from priorreg.methods import METHODS
from priorreg.methods import glands as gl
from priorreg.methods.adversarial import standardise
from priorreg.registration import register
from priorreg.spatial import Grid, resample
from priorreg.train import load_config, train
from priorreg.volume import Volume

from .geometry import oblique


@pytest.fixture(scope="module")
def shipped():
    return gl.LoadedGlands.load("glands_mrus", device="cpu")


@pytest.fixture(scope="module")
def test_pairs(shared_data):
    """The first two pairs of test patients (the split every MR-US model was trained around)."""
    return data.split_by_patient(data.mrus_pairs(shared_data))["test"][:2]


def _dice(truth: Volume, probability: Volume) -> float:
    return metrics.dice(data.binary_channels(truth).channel(0), data.binary_channels(probability).channel(0), labels=[1])[1]


def test_shipped_segmenters_find_the_gland_of_held_out_patients(shipped, test_pairs):
    for pair in test_pairs:
        v = pair.load()
        for role, image, labels in (("fixed", v.fixed, v.fixed_labels), ("moving", v.moving, v.moving_labels)):
            p = shipped.segment(image, role)
            assert Grid.of(p).matches(image) and p.array.shape == (1, *image.shape)
            assert 0 <= p.array.min() and p.array.max() <= 1
            assert _dice(labels, p) > 0.7, (pair.id, role)  # shipped: 0.76 and 0.87 on ultrasound, 0.90 and 0.86 on MR


def test_the_prediction_follows_the_image_not_its_header(shipped, test_pairs):
    # MR and TRUS headers describe unrelated frames: the same voxels under an oblique, moved header get the same gland
    v = test_pairs[0].load()
    moved = oblique([20, -35, 50], v.fixed.spacing, [120.0, -40.0, 300.0], v.fixed.shape, v.fixed.array)
    a, b = shipped.segment(v.fixed, "fixed"), shipped.segment(moved, "fixed")
    # the segmenter sees the same input but for rounding and two frame slices that lie exactly on the image's edges
    # (index -0.5), in for one header, out for the other; the network's receptive field carries that inward a little
    framed = [resample(standardise(image), gl.frame_grid(image, shipped.frames["fixed"])).array for image in (v.fixed, moved)]
    assert np.abs(framed[0] - framed[1])[2:-2].max() < 1e-3
    assert np.abs(a.array - b.array).mean() < 0.01
    assert metrics.dice(a.array[0] >= 0.5, b.array[0] >= 0.5, labels=[1])[1] > 0.97  # 0.978; outlines drawn in the wrong axes: far lower
    assert np.allclose(b.direction, moved.direction) and np.allclose(b.origin, moved.origin)


def test_registering_the_predicted_glands_beats_centring_on_held_out_patients(shipped, test_pairs):
    assert METHODS["glands"] is gl.register_glands
    gain = []
    for pair in test_pairs:
        v = pair.load()
        result = register(v.fixed, v.moving, "glands", loaded=shipped)  # images only: no labels given
        assert result.method == "glands" and Grid.of(result.field).matches(v.fixed)
        ours = pair_metrics(result.field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)
        centred = pair_metrics(register(v.fixed, v.moving, "centres").field, v.fixed, v.moving, v.fixed_labels, v.moving_labels)
        assert ours["folding_pct"] == 0
        # shipped (bench/results/glands_logs/glands_mrus_test.json): TRE 7.7 and 6.3 from 9.3 and 17.3 mm, Dice 0.78 and 0.86
        # from 0.78 and 0.67 (the first pair's ultrasound outline is too small: Dice 0.76 to the expert's)
        assert ours["tre_rms_mm"] < centred["tre_rms_mm"] - 1.0 and ours["dice_mean"] > 0.75, pair.id
        gain.append((centred["tre_rms_mm"] - ours["tre_rms_mm"], ours["dice_mean"] - centred["dice_mean"]))
    tre_gain, dice_gain = np.mean(gain, axis=0)
    assert tre_gain > 2.0 and dice_gain > 0.05


def test_a_gland_the_user_gives_replaces_the_prediction(shipped, test_pairs):
    v = test_pairs[0].load()
    given = gl.gland_of(v.moving_labels)
    assert given.array.shape == (1, *v.moving.shape) and given.array.sum() == (v.moving_labels.array[0] >= 0.5).sum()
    with_mr_contour = register(v.fixed, v.moving, "glands", loaded=shipped, moving_labels=v.moving_labels)
    predicted_only = register(v.fixed, v.moving, "glands", loaded=shipped)
    assert np.abs(with_mr_contour.field.array - predicted_only.field.array).max() > 0.5
    integer_map = v.moving_labels.with_array((v.moving_labels.array[0] >= 0.5).astype(np.uint8) * 1)
    assert np.array_equal(gl.gland_of(integer_map).array, given.array)
    empty = v.moving_labels.with_array(np.zeros_like(v.moving_labels.array))
    with pytest.raises(ValueError, match="empty"):
        register(v.fixed, v.moving, "glands", loaded=shipped, moving_labels=empty)


def test_an_image_without_a_gland_is_an_error_not_an_identity(shipped, test_pairs, shared_data):
    v = test_pairs[0].load()
    blank = v.fixed.with_array(np.zeros_like(v.fixed.array))
    with pytest.raises(ValueError, match="constant image"):
        register(blank, v.moving, "glands", loaded=shipped)
    lung_ct = Volume.read(shared_data / "lung_ct" / "3DCT_lung.mha")  # no prostate in view: the MR segmenter finds none
    with pytest.raises(ValueError, match="no gland found in the moving image"):
        register(v.fixed, lung_ct, "glands", loaded=shipped)
    with pytest.raises(ValueError, match="3D image"):
        shipped.segment(v.fixed_labels, "fixed")


def test_the_smallest_gland_bound_is_far_below_every_expert_gland(shared_data):
    """`MIN_GLAND_ML` must never refuse a real prostate: every expert gland of the shared set, either modality, is over 3.5 times it."""
    volumes = []
    for pair in data.mrus_pairs(shared_data):
        v = pair.load()
        volumes += [gl.gland_ml(gl.gland_of(labels)) for labels in (v.fixed_labels, v.moving_labels)]
    assert len(volumes) == 160 and min(volumes) > 3.5 * gl.MIN_GLAND_ML


def test_a_gland_too_small_for_a_prostate_is_an_error(shipped, test_pairs, shared_data):
    """A brain-MR crop is no prostate, but the ultrasound segmenter outlines a speck in it: the registration refuses it."""
    v = test_pairs[0].load()
    hippocampus = Volume.read(shared_data / "hippocampus" / "images" / "hippocampus_001.nii.gz")
    assert 0 < gl.gland_ml(shipped.segment(hippocampus, "fixed")) < gl.MIN_GLAND_ML  # what the check is for: not empty, yet no prostate
    with pytest.raises(ValueError, match=r"predicted in the fixed image .* mL, too small for a prostate"):
        register(hippocampus, v.moving, "glands", loaded=shipped)


def test_trainer_writes_a_model_the_method_loads(tmp_path, shared_data):
    config = {
        "name": "glands_tiny", "method": "glands", "iterations": 3, "batch_size": 2, "validate_every": 3,
        "data": {"root": str(shared_data), "limit": 2},
        "frame": {"shape": [12, 16, 12], "spacing": 6.0, "margin": 0},
        "moving_frame": {"shape": [16, 16, 16], "spacing": 6.0},
        "network": {"channels": [4, 8], "members": 1}, "moving_network": {"members": 2}, "moving_iterations": 2,
    }  # fmt: skip
    path = tmp_path / "glands.yaml"
    path.write_text(yaml.safe_dump(config))
    last = train(load_config(path), tmp_path / "run")
    assert last["iteration"] == 3 and 0 <= last["val_dice_fixed"] <= 1 and 0 <= last["val_dice_moving"] <= 1
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[-1].split(",")[4] == "nan"  # the MR segmenter stopped after its 2 iterations
    assert all(row.split(",")[3] != "nan" for row in log[1:])
    card = json.loads((tmp_path / "run" / "glands_tiny.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the card"))
    assert "moving" not in card["training"]["final_log"] and "fixed" in card["training"]["final_log"]
    assert card["method"] == "glands" and card["frames"]["moving"] == {"shape": [16, 16, 16], "spacing": 6.0}
    assert card["architecture"]["fixed"] == {"channels": [4, 8], "members": 1}
    assert card["architecture"]["moving"] == {"channels": [4, 8], "members": 2}
    assert set(card["training"]["patients"]) == {"train", "val", "test"} and len(card["training"]["train_pairs"]) == 2
    loaded = gl.LoadedGlands.load(tmp_path / "run" / "glands_tiny.safetensors", device="cpu")
    v = data.mrus_pairs(shared_data)[0].load()
    p = loaded.segment(v.moving, "moving")
    assert p.array.shape == (1, *v.moving.shape)
    # the ensemble's probability is its members' mean, and the members were trained apart (different weights)
    members = loaded.nets["moving"].members
    frame = gl.frame_grid(v.moving, loaded.frames["moving"])
    x = torch.as_tensor(resample(standardise(v.moving), frame).array, dtype=torch.float32)[None, None]
    with torch.no_grad():
        each = [torch.sigmoid(m(x)) for m in members]
    assert not torch.allclose(each[0], each[1])
    assert torch.allclose(loaded.nets["moving"](x), (each[0] + each[1]) / 2)
    assert len(loaded.nets["fixed"].members) == 1
    with pytest.raises(ValueError, match="model, not a 'glands' one"):
        gl.LoadedGlands.load("adversarial_mrus")
    bad = {**config, "data": {"task": "hippocampus"}}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="gland trainer knows 'mrus_prostate'"):
        load_config(path)


def test_the_mr_draws_do_not_depend_on_the_ultrasound_settings(tmp_path):
    """A wider or differently augmented ultrasound segmenter leaves the MR segmenter's training as it was."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"method": "glands", "network": {"members": 2}}))
    base = load_config(path)
    path.write_text(yaml.safe_dump({"method": "glands", "augment": {"scale": 0.3}, "moving_augment": {"scale": 0.1}}))
    wider = load_config(path)
    assert wider["moving_augment"] == base["moving_augment"] and wider["augment"]["scale"] == 0.3
    sizes = {"fixed": 5, "moving": 4}
    for member in (0, 1):
        a, b = tg.draw_batch(base, 7, sizes, member), tg.draw_batch(wider, 7, sizes, member)
        assert all(torch.equal(a["moving"][k], b["moving"][k]) for k in a["moving"])
        assert not torch.equal(a["fixed"]["affine"], b["fixed"]["affine"])
    path.write_text(yaml.safe_dump({"method": "glands", "moving_network": {"width": 2}}))
    with pytest.raises(ValueError, match="unknown moving_network keys"):
        load_config(path)
    path.write_text(yaml.safe_dump({"method": "glands", "iterations": 10, "moving_iterations": 11}))
    with pytest.raises(ValueError, match="moving_iterations"):
        load_config(path)


def test_register_from_the_command_line_with_the_planning_contour(tmp_path, shared_data, test_pairs):
    pair = test_pairs[0]
    out = tmp_path / "out"
    args = [
        "--data-root", str(shared_data), "register", "--method", "glands", "--device", "cpu",
        "--fixed", str(pair.fixed), "--moving", str(pair.moving), "--fixed-labels", str(pair.fixed_labels),
        "--moving-labels", str(pair.moving_labels), "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    images_only = json.loads((out / "metrics.json").read_text())
    assert main([*args, "--label-channels", "0", "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert images_only["method"] == "glands" and (out / "warped.nii.gz").exists()
    # both expert glands given: the label-only "oracle", which fits the glands better than predictions can
    assert both["registered"]["dice_mean"] > images_only["registered"]["dice_mean"] > images_only["identity"]["dice_mean"]
    # the planning case: only the MR contour is at hand; the ultrasound gland is predicted
    contour_only = ["--moving-labels", str(pair.moving_labels), "--label-channels", "0"]
    plain = [a for a in args if a not in ("--fixed-labels", str(pair.fixed_labels), "--moving-labels", str(pair.moving_labels))]
    assert main([*plain[:-1], str(tmp_path / "contour"), *contour_only]) == 0
    assert json.loads((tmp_path / "contour" / "metrics.json").read_text())["method"] == "glands"
    assert main([*plain[:-1], str(tmp_path / "none"), "--label-channels", "0"]) == 2
    assert not (tmp_path / "none").exists()


def test_the_images_mutual_information_can_join_the_outlines(tmp_path, shared_data, test_pairs):
    """--image-weight adds the images' mutual information beside the outlines: it reaches the method, moves the field,
    and the registration still beats centring without folding (README: validation median TRE 5.88 -> 5.12 mm at 0.3)."""
    pair = test_pairs[0]
    base = ["--data-root", str(shared_data), "register", "--method", "glands", "--device", "cpu", "--fixed", str(pair.fixed),
            "--moving", str(pair.moving), "--fixed-labels", str(pair.fixed_labels), "--moving-labels", str(pair.moving_labels)]  # fmt: skip
    reports, fields = {}, {}
    for weight in ("0", "0.3"):
        out = tmp_path / weight
        assert main([*base, "--image-weight", weight, "--out", str(out)]) == 0
        reports[weight] = json.loads((out / "metrics.json").read_text())
        fields[weight] = Volume.read(out / "field.nii.gz").array
    assert reports["0.3"]["options"]["image_weight"] == 0.3
    assert np.abs(fields["0.3"] - fields["0"]).max() > 0.5
    ours, start = reports["0.3"]["registered"], reports["0.3"]["identity"]
    assert ours["folding_pct"] == 0 and ours["dice_mean"] > 0.75 and ours["tre_rms_mm"] < start["tre_rms_mm"] - 5.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "adversarial", "--label-channels", "0"], "adversarial is not driven by labels"),
        (["--method", "glands", "--init", "centres"], "--init is for iterative and dip"),
        (["--method", "glands", "--label-roles", "moving"], "give --label-channels too"),
        (["--method", "iterative", "--label-channels", "0", "--label-roles", "moving"], "iterative needs both images' labels"),
    ],
)
def test_evaluate_refuses_options_the_method_does_not_take(tmp_path, shared_data, capsys, extra, message):
    out = tmp_path / "report.json"
    assert main(["--data-root", str(shared_data), "evaluate", "--task", "mrus_prostate", "--pairs", "1", *extra, "--json", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_evaluate_with_expert_labels_says_so_in_the_report(tmp_path, shared_data):
    out = tmp_path / "oracle.json"
    args = ["--data-root", str(shared_data), "evaluate", "--task", "mrus_prostate", "--method", "iterative", "--init", "centres"]
    assert main([*args, "--label-channels", "0", "--pairs", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["label_channels"] == [0] and report["options"]["init"] == "centres"
    assert report["pairs"][0]["dice_mean"] > 0.85  # the expert gland drove it


def test_evaluate_the_planning_case_predicts_only_the_ultrasound_gland(tmp_path, shared_data):
    """`--label-roles moving`: each pair's expert MR gland is given (the biopsy planning contour), the US gland predicted."""
    out = tmp_path / "planning.json"
    args = ["--data-root", str(shared_data), "evaluate", "--task", "mrus_prostate", "--method", "glands", "--pairs", "1"]
    assert main([*args, "--label-channels", "0", "--label-roles", "moving", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["label_roles"] == ["moving"] and report["label_channels"] == [0]
    assert report["model"].endswith("glands_mrus.safetensors")  # the ultrasound segmenter ran
    assert report["pairs"][0]["dice_mean"] > 0.75


@pytest.mark.parametrize("roles", [("moving",), ("fixed",), ("fixed", "moving")])
def test_evaluate_task_gives_the_method_only_the_chosen_roles_labels(shared_data, roles):
    given = []

    def registrar(fixed, moving, **labels):
        given.append(labels)
        return Volume(np.zeros((3, *fixed.shape), np.float32), fixed.spacing, fixed.origin, fixed.direction)

    report = evaluate_task("mrus_prostate", "glands", shared_data, n_pairs=1, registrar=registrar, label_channels=[0], label_roles=roles)
    assert sorted(given[0]) == sorted(f"{r}_labels" for r in roles)
    assert all(labels.channels == 1 for labels in given[0].values())  # the gland channel, not the landmarks
    assert report["label_roles"] == list(roles)


def test_evaluate_task_refuses_unknown_label_roles(shared_data):
    with pytest.raises(ValueError, match="label_roles"):
        evaluate_task("mrus_prostate", "glands", shared_data, n_pairs=1, label_channels=[0], label_roles=("mr",))
