"""`priorreg train` for symmetric spatial-gradient registration (config `method: symmetric`, seed 004).

The loop, resume, checkpoints, logs and torchrun support are `train.TrainingRun`'s; this module
holds the data and the step. Data: the hippocampus subjects, split by subject with
`data.split_groups` (the split `priorreg evaluate --task hippocampus --split test` uses too), each
framed once around its own field of view. Every iteration draws, seeded with `(seed, t)`, pairs
of different training subjects, a flip per pair (both images, so the pair stays anatomical) and
an independent rotation, scaling and shift per image (the paper's flips, rotations and
translations), and scores both directions at every deep-supervision head.

Labels: every training subject has labels here, and all are used (`loss.weights.dice`). The
paper's noisy labels (a segmentation network's labels on unlabelled scans, for pretraining)
have no unlabelled scans to act on in this data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import data
from .evaluate import pair_metrics, summarise
from .grid import Grid
from .methods import symmetric as sym
from .methods.adversarial import points_through
from .methods.airnet import rotation_matrix
from .spatial import sample
from .train import SPLIT_DEFAULTS, ConfigError, TrainingRun, check_frame_levels
from .volume import Volume

DEFAULTS: dict = {
    "name": "symmetric_hippocampus",
    "method": "symmetric",
    "seed": 0,
    "device": "auto",
    "data": {
        "root": None,
        "task": "hippocampus",
        **SPLIT_DEFAULTS,
        "limit": None,  # use only the first N training subjects (tests)
        "val_pairs": None,  # validate on the first N validation pairs (default: all)
    },
    "frame": {"shape": [48, 56, 40], "spacing": 1.0, "margin": 0},
    "network": {"channels": [16, 32, 64, 128], "output_level": 1, "heads": 3},
    # dice_sigmas_mm [0]: the paper's soft Dice; more sigmas: multiscale Dice (methods.symmetric.pair_loss)
    "loss": {
        "similarity": "mse",
        "weights": {"similarity": 1.0, "dice": 1.0, "smoothness": 0.1},
        "heads": [1.0, 0.5, 0.25],
        "dice_sigmas_mm": [0.0],
    },
    "augment": {"flip": True, "rotation_deg": 10.0, "scale": 0.05, "shift_mm": 3.0},
    # written into the card: the Gaussian (mm) on the predicted fields at inference, validation included
    "postprocessing": {"smooth_mm": 0.0},
    "iterations": 2000,
    "batch_size": 4,
    "lr": 1e-4,  # the paper's Adam rate
    "lr_final": None,  # when set, the rate decays exponentially from lr to lr_final over the run
    "checkpoint_every": 100,
    "validate_every": 250,
    "log_every": 10,
}


def check_config(config: dict) -> dict:
    if config["data"]["task"] != "hippocampus":
        raise ConfigError(f"data.task {config['data']['task']!r}: the symmetric trainer knows 'hippocampus'")
    if config["loss"]["similarity"] not in sym.SIMILARITIES:
        raise ConfigError(f"loss.similarity must be one of {sym.SIMILARITIES}, got {config['loss']['similarity']!r}")
    n = config["network"]
    levels = check_frame_levels(config)
    if len(config["loss"]["heads"]) < min(n["heads"], levels - n["output_level"]):
        raise ConfigError(f"loss.heads needs a weight for each of the network's {n['heads']} heads")
    if config["frame"]["margin"]:
        raise ConfigError("frame.margin must be 0: both images of a pair share one frame")
    if not config["postprocessing"]["smooth_mm"] >= 0:
        raise ConfigError(f"postprocessing.smooth_mm must be 0 or more (mm), got {config['postprocessing']['smooth_mm']}")
    return config


@dataclass
class SymmetricLosses:
    loss: float
    similarity: float
    dice: float
    smoothness: float


def subject_splits(d: dict) -> dict[str, list[str]]:
    """Subject ids per split: the same cut `evaluate` makes for `--split`."""
    return data.split_groups(data.hippocampus_subjects(d["root"]), d["val_fraction"], d["test_fraction"], d["split_seed"])


class FramedSubjects:
    """Every training subject's image and one-hot labels on the model frame, centred on its own FOV."""

    def __init__(self, subjects: list[str], root, frame: sym.ModelFrame):
        self.ids = list(subjects)
        images, labels = [], []
        for subject in self.ids:
            image_file, label_file = data.hippocampus_files(subject, root)
            image = Volume.read(image_file)
            grid = Grid.of(image)
            framed = sym.frame_image(image, frame, grid.center, grid.direction, Volume.read(label_file))
            images.append(framed["image"])
            labels.append(framed["labels"])
        self.images = torch.as_tensor(np.stack(images))
        self.labels = torch.as_tensor(np.stack(labels))

    def __len__(self) -> int:
        return len(self.ids)


def lr_at(config: dict, t: int) -> float:
    """Adam's rate at iteration `t`: constant, or exponential from `lr` to `lr_final`."""
    lr, final = config["lr"], config["lr_final"]
    return lr if final is None else lr * (final / lr) ** (t / max(config["iterations"] - 1, 1))


def random_affines(g: torch.Generator, n: int, flips: torch.Tensor, a: dict) -> torch.Tensor:
    """`[n, 3, 4]` maps about the frame centre: flip (given), rotation, isotropic scale, shift."""
    angles = (torch.rand(n, 3, generator=g) * 2 - 1) * a["rotation_deg"]
    scale = 1 + (torch.rand(n, 1, 1, generator=g) * 2 - 1) * a["scale"]
    shift = (torch.rand(n, 3, 1, generator=g) * 2 - 1) * a["shift_mm"]
    matrix = rotation_matrix(angles) * scale @ torch.diag_embed(flips)
    return torch.cat([matrix, shift], dim=2)


def draw_batch(config: dict, t: int, n_subjects: int) -> dict:
    """Everything random in iteration `t` for the whole global batch (same on every rank)."""
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + t)
    b = config["batch_size"]
    fixed = torch.randint(n_subjects, (b,), generator=g)
    moving = (fixed + 1 + torch.randint(n_subjects - 1, (b,), generator=g)) % n_subjects  # never the same subject
    a = config["augment"]
    flips = torch.where(torch.rand(b, 3, generator=g) < 0.5, -1.0, 1.0) if a["flip"] else torch.ones(b, 3)
    return {
        "fixed": fixed,
        "moving": moving,
        "fixed_affine": random_affines(g, b, flips, a),
        "moving_affine": random_affines(g, b, flips, a),
    }


class SymmetricTrainer(TrainingRun):
    LOG_COLUMNS: ClassVar[list[str]] = [
        "iteration", "seconds", "lr", "loss", "similarity", "dice", "smoothness",
        "val_dice", "val_dice30", "val_hd95_mm", "val_sdlogj", "val_folding_pct",
    ]  # fmt: skip

    def setup(self) -> None:
        c = self.config
        d = c["data"]
        splits = subject_splits(d)
        train = splits["train"][: d["limit"]] if d["limit"] else splits["train"]
        if len(train) < 2:
            raise ConfigError("fewer than 2 training subjects: check data.root and the split fractions")
        self.data = FramedSubjects(train, d["root"], self.frame)
        self.data.groups = splits
        self.data.train_ids = self.data.ids
        val = data.hippocampus_pairs(d["root"], subjects=splits["val"]) if len(splits["val"]) > 1 else []
        self.val_pairs = val[: d["val_pairs"]] if d["val_pairs"] else val
        n = c["network"]
        self.card = sym.model_card(self.frame, n["channels"], n["output_level"], n["heads"], "centres", c["postprocessing"]["smooth_mm"])
        self.net = sym.build_network(self.card).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=c["lr"])
        self.modules, self.optims = {"network": self.net}, {"network": self.opt}
        self.net_p = self.wrap(self.net)
        self.grid = self.frame.canonical()

    def _batch(self, draw: dict) -> dict:
        """This rank's slice of the drawn global batch, augmented, on the device."""
        b = self.config["batch_size"] // self.world
        part = slice(self.rank * b, (self.rank + 1) * b)
        out = {}
        for role in ("fixed", "moving"):
            idx = draw[role][part]
            both = torch.cat([self.data.images[idx], self.data.labels[idx]], dim=1).to(self.device)
            moved = sample_affine(both, self.grid, draw[f"{role}_affine"][part].to(self.device))
            out[role], out[f"{role}_labels"] = moved[:, :1], moved[:, 1:]
        return out

    def log_extra(self, t: int) -> dict:
        return {"lr": lr_at(self.config, t)}

    def step(self, t: int) -> SymmetricLosses:
        c = self.config
        for group in self.opt.param_groups:
            group["lr"] = lr_at(c, t)
        batch = self._batch(draw_batch(c, t, len(self.data)))
        forward, backward = self.net_p(batch["fixed"], batch["moving"])
        weights, sim, sigmas = c["loss"]["weights"], c["loss"]["similarity"], c["loss"]["dice_sigmas_mm"]
        total = batch["fixed"].new_zeros(())
        parts = {"similarity": 0.0, "dice": 0.0, "smoothness": 0.0}
        for h, (gf, gb) in enumerate(zip(forward, backward)):
            w = c["loss"]["heads"][h]
            lf, pf = sym.pair_loss(gf, batch["fixed"], batch["moving"], batch["fixed_labels"], batch["moving_labels"], self.grid, weights, sim, sigmas)
            lb, pb = sym.pair_loss(gb, batch["moving"], batch["fixed"], batch["moving_labels"], batch["fixed_labels"], self.grid, weights, sim, sigmas)
            total = total + w * (lf + lb)
            if h == 0:  # the logged parts are the finest head's, both directions averaged
                parts = {k: (pf.get(k, 0.0) + pb.get(k, 0.0)) / 2 for k in parts}
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return SymmetricLosses(loss=total.item(), **parts)

    def training_card(self, last: dict) -> dict:
        card = super().training_card(last)
        card["train_subjects"] = card.pop("train_pairs")  # pairs are drawn afresh every iteration
        return card

    def validate(self) -> dict:
        """Dice, Dice30, HD95, SDlogJ and folding on the validation subjects' pairs (images only)."""
        if not self.val_pairs:
            return {}
        model = sym.LoadedSymmetric(self.net, self.card, self.device)
        self.net.eval()
        rows = []
        for pair in self.val_pairs:
            v = pair.load()
            field = sym.register_symmetric(v.fixed, v.moving, loaded=model).field
            rows.append(pair_metrics(field, v.fixed, v.moving, v.fixed_labels, v.moving_labels))
        self.net.train()
        s = summarise(rows)
        keys = {"val_dice": "dice_mean", "val_dice30": "dice30", "val_hd95_mm": "hd95_mm", "val_sdlogj": "sdlogj", "val_folding_pct": "folding_pct"}
        return {k: s.get(v, math.nan) for k, v in keys.items()}


def sample_affine(image: torch.Tensor, grid: Grid, affine: torch.Tensor) -> torch.Tensor:
    """`image` `[B, C, ...]` on the canonical `grid`, resampled at each sample's affine of the grid points."""
    return sample(image, grid, points_through(affine, grid.points(device=image.device)))
