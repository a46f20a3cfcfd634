"""`priorreg train` for the segmenter of `methods/segreg.py` (config `method: segreg`).

The loop, resume, checkpoints, logs and torchrun support are `train.TrainingRun`'s; this module
holds the data and the step. Data: the hippocampus training subjects (`train_symmetric.subject_splits`,
the split the symmetric network and `priorreg evaluate --task hippocampus --split` use), each
image with its expert labels framed once around its own field of view (`FramedSubjects`). Every
iteration draws, seeded with `(seed, t)`, a batch of subjects, a rotation, scaling and shift of
each about the frame centre (no flips: a flip along the long axis would swap the anterior and
posterior labels), and an intensity gain and offset; one Adam step on cross-entropy plus the
soft Dice of each structure. Validation: the mean Dice over structures of the segmenter's labels
on the validation subjects' own grids, as registration uses them.

`members: N` (> 1) trains N such networks from seeds `seed`, `seed + 1`, ... and writes them as
one ensemble model (`train_members`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import data, metrics
from .methods import segreg
from .models import save_model
from .train import SPLIT_DEFAULTS, ConfigError, TrainingRun, check_frame_levels
from .train_symmetric import FramedSubjects, lr_at, random_affines, sample_affine, subject_splits
from .volume import Volume

DEFAULTS: dict = {
    "name": "segreg_hippocampus",
    "method": "segreg",
    "seed": 0,
    "device": "auto",
    "data": {
        "root": None,
        "task": "hippocampus",
        **SPLIT_DEFAULTS,
        "limit": None,  # use only the first N training subjects (tests)
    },
    "frame": {"shape": [48, 56, 40], "spacing": 1.0, "margin": 0},  # the symmetric network's: every crop fits
    "network": {"channels": [16, 32, 64, 96]},
    "augment": {"rotation_deg": 10.0, "scale": 0.1, "shift_mm": 3.0, "gain": 0.1, "offset": 0.1},
    "iterations": 3000,
    "batch_size": 4,
    "lr": 1e-3,
    "lr_final": 1e-4,  # exponential decay from lr
    "members": 1,  # networks in the model, each trained alike from its own seed (train_members)
    "checkpoint_every": 100,
    "validate_every": 500,
    "log_every": 10,
}
LABELS = {1: "anterior hippocampus", 2: "posterior hippocampus"}  # the shared data's README
MODALITY = "T1-weighted MR"


def check_config(config: dict) -> dict:
    if config["data"]["task"] != "hippocampus":
        raise ConfigError(f"data.task {config['data']['task']!r}: the segmenter trainer knows 'hippocampus'")
    if config["frame"]["margin"]:
        raise ConfigError("frame.margin must be 0: the segmenter sees one image")
    check_frame_levels(config)
    return config


@dataclass
class SegmenterLosses:
    loss: float
    cross_entropy: float
    dice: float


def draw_batch(config: dict, t: int, n_subjects: int) -> dict:
    """Everything random in iteration `t` for the whole global batch (same on every rank)."""
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + t)
    b, a = config["batch_size"], config["augment"]
    return {
        "index": torch.randint(n_subjects, (b,), generator=g),
        "affine": random_affines(g, b, torch.ones(b, 3), a),
        "gain": 1 + (torch.rand(b, generator=g) * 2 - 1) * a["gain"],
        "offset": torch.randn(b, generator=g) * a["offset"],
    }


def segmentation_loss(logits: torch.Tensor, foreground: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Cross-entropy over background and structures plus the mean soft Dice loss of the structures.

    `foreground`: `[B, L, ...]` label fractions in [0, 1] (interpolated one-hot); the background is what they leave.
    """
    target = torch.cat([(1 - foreground.sum(1, keepdim=True)).clamp(0, 1), foreground], 1)
    ce = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    p = logits.softmax(1)[:, 1:]
    dims = tuple(range(2, p.dim()))
    dice = 1 - (2 * (p * foreground).sum(dims) + 1) / (p.sum(dims) + foreground.sum(dims) + 1)
    return ce + dice.mean(), ce.item(), dice.mean().item()


def label_dice(segmented: Volume, truth: Volume, labels: list[int]) -> float:
    """Mean Dice over `labels` of a segmenter's channels against an integer label map on the same grid."""
    values = [metrics.dice((segmented.array[c] > 0.5).astype(np.int8), (truth.array == v).astype(np.int8), labels=[1])[1] for c, v in enumerate(labels)]
    return float(np.nanmean(values))


def validation_dice(model: segreg.LoadedSegmenter, subjects: list[str], root) -> float:
    """Mean over `subjects` of `label_dice` of the model's outlines on each subject's own image grid."""
    values = []
    for subject in subjects:
        image_file, label_file = data.hippocampus_files(subject, root)
        values.append(label_dice(model.segment(Volume.read(image_file)), Volume.read(label_file), model.labels))
    return float(np.mean(values)) if values else math.nan


class SegmenterTrainer(TrainingRun):
    LOG_COLUMNS: ClassVar[list[str]] = ["iteration", "seconds", "lr", "loss", "cross_entropy", "dice", "val_dice"]

    def setup(self) -> None:
        c = self.config
        d = c["data"]
        splits = subject_splits(d)
        train = splits["train"][: d["limit"]] if d["limit"] else splits["train"]
        if not train:
            raise ConfigError("no training subjects: check data.root and the split fractions")
        self.data = FramedSubjects(train, d["root"], self.frame)
        if self.data.labels.shape[1] != len(LABELS):
            raise ConfigError(f"the training labels have {self.data.labels.shape[1]} structures, expected {len(LABELS)}")
        self.data.groups, self.data.train_ids = splits, self.data.ids
        self.val = splits["val"]
        self.card = segreg.model_card(self.frame, c["network"]["channels"], LABELS, MODALITY)
        self.net = segreg.build_network(self.card).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=c["lr"])
        self.modules, self.optims = {"network": self.net}, {"network": self.opt}
        self.net_p = self.wrap(self.net)
        self.grid = self.frame.canonical()

    def _batch(self, draw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the drawn global batch: augmented images and label fractions on the frame."""
        b = self.config["batch_size"] // self.world
        part = slice(self.rank * b, (self.rank + 1) * b)
        idx = draw["index"][part]
        both = torch.cat([self.data.images[idx], self.data.labels[idx]], dim=1).to(self.device)
        moved = sample_affine(both, self.grid, draw["affine"][part].to(self.device))
        gain, offset = (draw[k][part].to(self.device).view(-1, 1, 1, 1, 1) for k in ("gain", "offset"))
        return moved[:, :1] * gain + offset, moved[:, 1:]

    def log_extra(self, t: int) -> dict:
        return {"lr": lr_at(self.config, t)}

    def step(self, t: int) -> SegmenterLosses:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.config, t)
        x, y = self._batch(draw_batch(self.config, t, len(self.data)))
        loss, ce, dice = segmentation_loss(self.net_p(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return SegmenterLosses(loss=loss.item(), cross_entropy=ce, dice=dice)

    def validate(self) -> dict:
        """Mean Dice over structures on the validation subjects, on each image's own grid."""
        if not self.val:
            return {}
        self.net.eval()
        value = validation_dice(segreg.LoadedSegmenter([self.net], self.card, self.device), self.val, self.config["data"]["root"])
        self.net.train()
        return {"val_dice": value}


ENSEMBLE_LOG_COLUMNS = ["member", "seed", "iteration", "seconds", "val_dice"]


def train_members(config: dict, out, progress=None, cancel=None) -> dict:
    """Train `config['members']` segmenters and write them as one ensemble model `out/<name>.safetensors`.

    Member k is a whole single-network run of this config from seed `seed + k`, in `out/member<k>`
    (its own log, checkpoints and model file; a rerun resumes it, or reuses it when finished). The
    ensemble's card keeps the members' figures and its own validation Dice (the averaged
    probabilities' outlines); `out/log.csv` has a row per member and one for the ensemble.
    Why: one CPU-sized network's outlines level off (hippocampus validation Dice 0.862 at 2500
    iterations, 0.864 at 3000) and averaging over shifted frames of it gained nothing; networks from
    other seeds err in other voxels.
    """
    out, n, iterations = Path(out), config["members"], config["iterations"]
    trainers, rows = [], []
    for k in range(n):
        member = {**config, "members": 1, "seed": config["seed"] + k, "name": f"{config['name']}_member{k}"}

        def shifted(row, total, k=k):  # one bar over all members
            progress({**row, "iteration": row["iteration"] + k * iterations}, n * iterations)

        trainers.append(SegmenterTrainer(member, out / f"member{k}", shifted if progress else None, cancel))
        last = trainers[-1].run()
        rows.append({"member": k, "seed": member["seed"], **{c: last.get(c) for c in ("iteration", "seconds", "val_dice")}})
    first = trainers[0]
    if first.rank != 0:
        return rows[-1]
    card = segreg.model_card(first.frame, config["network"]["channels"], LABELS, MODALITY, members=n)
    model = segreg.LoadedSegmenter([t.net.eval() for t in trainers], card, first.device)
    ensemble = {"member": "ensemble", "seed": "", "iteration": n * iterations, "seconds": sum(r["seconds"] for r in rows)}
    ensemble["val_dice"] = validation_dice(model, first.val, config["data"]["root"])
    card["training"] = {
        **first.training_card({}),  # data, split, training subjects, processes, command; the figures below
        "config": config,
        "iterations": ensemble["iteration"],
        "seconds": ensemble["seconds"],
        "members": rows,
        "final_log": {"val_dice": ensemble["val_dice"]},
    }
    tensors = {f"member{k}.{key}": v for k, t in enumerate(trainers) for key, v in t.net.state_dict().items()}
    save_model(out / f"{config['name']}.safetensors", tensors, card)
    with (out / "log.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ENSEMBLE_LOG_COLUMNS)
        w.writeheader()
        w.writerows([*rows, ensemble])
    if progress:
        progress(ensemble, n * iterations)
    return ensemble
