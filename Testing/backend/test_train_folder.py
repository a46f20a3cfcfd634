"""Training on a user's own folder of pairs (issue 7: users who bring their own data), with cancel and resume."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from priorreg import Volume
from priorreg.data import folder_pairs
from priorreg.evaluate import pair_metrics
from priorreg.methods.adversarial import register_adversarial
from priorreg.models import load_model
from priorreg.registration import Cancelled
from priorreg.spatial import Grid
from priorreg.train import ConfigError, load_config, train

SUBJECTS = ("004", "006", "007", "008")


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory, shared_data):
    """Hippocampus MR pairs as a user would lay them out: two visits of one "patient" share its prefix."""
    root = shared_data / "hippocampus"
    folder = tmp_path_factory.mktemp("my_pairs")
    names = ["p1__a", "p1__b", "p2", "p3"]
    for name, (f, m) in zip(names, [(SUBJECTS[0], SUBJECTS[1]), (SUBJECTS[0], SUBJECTS[2]), (SUBJECTS[1], SUBJECTS[3]), (SUBJECTS[2], SUBJECTS[3])]):
        sub = folder / name
        sub.mkdir()
        for role, subject in (("fixed", f), ("moving", m)):
            Volume.read(root / "images" / f"hippocampus_{subject}.nii.gz").write(sub / f"{role}.nii.gz")
            Volume.read(root / "labels" / f"hippocampus_{subject}.nii.gz").write(sub / f"{role}_labels.nrrd")
    (folder / "notes").mkdir()  # a folder without images is not a pair
    return folder


def folder_config(folder, **overrides):
    return load_config(
        None, regularizer="bending", iterations=4, batch_size=2, validate_every=4, checkpoint_every=100, log_every=1,
        network={"n0": 2, "depth": 2}, frame={"shape": [16, 16, 16], "spacing": "auto", "margin": 4}, name="my_model",
        data={"task": "folder", "root": str(folder), "labels": "all", "val_fraction": 0.34, "test_fraction": 0.0}, **overrides,
    )  # fmt: skip


def test_folder_layout_ids_groups_and_labels(pairs_folder):
    pairs = folder_pairs(pairs_folder)
    assert [p.id for p in pairs] == ["p1__a", "p1__b", "p2", "p3"]
    assert [p.group for p in pairs] == ["p1", "p1", "p2", "p3"]
    assert all(p.fixed.name == "fixed.nii.gz" and p.moving_labels.name == "moving_labels.nrrd" for p in pairs)


def test_folder_errors_say_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder of pairs"):
        folder_pairs(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no pair subfolders"):
        folder_pairs(tmp_path)
    volume = Volume(np.zeros((4, 4, 4), np.float32), np.ones(3), np.zeros(3), np.eye(3))
    (tmp_path / "case1").mkdir()
    volume.write(tmp_path / "case1" / "fixed.nii.gz")
    with pytest.raises(ValueError, match="case1: no moving image"):
        folder_pairs(tmp_path)
    volume.write(tmp_path / "case1" / "moving.mha")
    volume.write(tmp_path / "case1" / "fixed_labels.nii.gz")
    with pytest.raises(ValueError, match="labels for one image only"):
        folder_pairs(tmp_path)
    volume.write(tmp_path / "case1" / "moving_labels.nii")
    volume.write(tmp_path / "case1" / "moving_labels.nii.gz")
    with pytest.raises(ValueError, match="2 files for moving_labels"):
        folder_pairs(tmp_path)
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, regularizer="bending", data={"task": "folder"})


def test_auto_frame_covers_every_fixed_image(pairs_folder):
    config = folder_config(pairs_folder)
    shape = np.array(config["frame"]["shape"][::-1], dtype=float)
    extents = [Grid.of(Volume.read(p.fixed)).spacing * (np.array(Volume.read(p.fixed).shape[::-1]) - 1) for p in folder_pairs(pairs_folder)]
    need = np.max(extents, axis=0)
    spacing = config["frame"]["spacing"]
    assert np.all((shape - 1) * spacing >= need) and np.any((shape - 1) * (spacing - 0.1) < need)  # covers, and no coarser than needed


def test_cancel_keeps_a_checkpoint_that_resumes_to_the_same_model(tmp_path, pairs_folder):
    straight = train(folder_config(pairs_folder), tmp_path / "straight")
    rows = []

    def progress(row, total):
        rows.append(row["iteration"])

    with pytest.raises(Cancelled, match="cancelled at iteration 2 of 4"):
        train(folder_config(pairs_folder), tmp_path / "resumed", progress, cancel=lambda: len(rows) >= 2)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").exists() and not (tmp_path / "resumed" / "my_model.safetensors").exists()
    resumed = train(folder_config(pairs_folder), tmp_path / "resumed", progress)
    assert rows == [1, 2, 3, 4] and resumed["iteration"] == straight["iteration"] == 4
    a, b = (load_file(tmp_path / run / "my_model.safetensors") for run in ("straight", "resumed"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)

    # The card says what it was trained on; p1's two pairs stayed in one split; validation ran on labels.
    card = load_model(tmp_path / "resumed" / "my_model.safetensors")[1]
    training = card["training"]
    assert training["data"] == f"the user's pairs in {pairs_folder}"
    assert {"p1__a", "p1__b"} <= set(training["train_pairs"]) or not {"p1__a", "p1__b"} & set(training["train_pairs"])
    assert 0 < training["final_log"]["val_dice"] <= 1

    # The model registers a pair as any shipped one does, on the fixed grid.
    pair = folder_pairs(pairs_folder)[0].load()
    result = register_adversarial(pair.fixed, pair.moving, model=tmp_path / "resumed" / "my_model.safetensors", device="cpu")
    assert Grid.of(result.field).matches(pair.fixed)
    assert 0 <= pair_metrics(result.field, pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels)["dice_mean"] <= 1
