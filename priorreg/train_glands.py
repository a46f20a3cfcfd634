"""`priorreg train` for the gland segmenters of `methods/glands.py` (config `method: glands`).

The loop, resume, checkpoints, logs and torchrun support are `train.TrainingRun`'s; this module
holds the data and the step. Data: the MR-US training patients (`data.split_by_patient`, the
split every MR-US model and `evaluate --split` use), each distinct image once with its expert
gland (label channel 0): ultrasound images for the `fixed` segmenter, MR images for the `moving`
one. Images stay on their own grids; every iteration samples each drawn image straight onto its
segmenter's frame through a random rotation, scaling and shift about the image centre (one
resampling, no pre-framed copy), and scales its intensities by a random gain and offset. Both
segmenters take one Adam step per iteration on soft Dice + binary cross-entropy. With
`network.members` K > 1 each modality's segmenter is an ensemble: K U-Nets, each initialised
and fed its own draws (member 0's are those of a single-network run), averaged at inference.

`frame` is the ultrasound (fixed) segmenter's frame (margin 0) and `moving_frame` the MR's:
each covers its modality's field of view at 2 mm (the shared US images are up to 94 mm across,
the MR 103 mm). Likewise `network` and `augment` are the ultrasound segmenter's, and
`moving_network` and `moving_augment` change what differs for the MR's (None: the same): the
ultrasound outline is the harder one and may warrant a wider network; `moving_iterations` stops
the MR's training earlier. The ultrasound networks are built first and every draw of a role is
made whatever the other role's settings, so a run's ultrasound segmenter is that of a run with
the same ultrasound settings alone; the MR's draws do not depend on the ultrasound settings, its
initial weights do (the networks are built in turn from one seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from . import data, metrics
from .grid import Grid
from .methods import glands as gl
from .methods.adversarial import ModelFrame, points_through, standardise
from .methods.airnet import rotation_matrix
from .spatial import sample
from .train import SPLIT_DEFAULTS, ConfigError, TrainingRun, patient_split

DEFAULTS: dict = {
    "name": "glands_mrus",
    "method": "glands",
    "seed": 0,
    "device": "auto",
    "data": {
        "root": None,
        "task": "mrus_prostate",
        **SPLIT_DEFAULTS,
        "limit": None,  # use only the first N training pairs (tests)
    },
    "frame": {"shape": [36, 48, 36], "spacing": 2.0, "margin": 0},  # the ultrasound (fixed) segmenter's
    "moving_frame": {"shape": [52, 52, 52], "spacing": 2.0},  # the MR (moving) segmenter's
    "network": {"channels": [16, 32, 48, 64], "members": 1},  # the ultrasound (fixed) segmenter's
    "moving_network": None,  # the MR's: the keys of `network` that differ (None: the same)
    "augment": {"rotation_deg": 10.0, "scale": 0.1, "shift_mm": 5.0, "gain": 0.2, "offset": 0.1},  # the ultrasound's
    "moving_augment": None,  # the MR's: the keys of `augment` that differ
    "iterations": 1500,  # the ultrasound segmenter's (and the run's)
    "moving_iterations": None,  # the MR segmenter's, at most `iterations` (None: the same); it stops there
    "batch_size": 2,
    "lr": 1e-3,  # cosine decay to 0 over the run
    "checkpoint_every": 100,
    "validate_every": 250,
    "log_every": 10,
}
MODALITIES = {"fixed": "3D transrectal ultrasound", "moving": "T2-weighted MR"}


def check_config(config: dict) -> dict:
    if config["data"]["task"] != "mrus_prostate":
        raise ConfigError(f"data.task {config['data']['task']!r}: the gland trainer knows 'mrus_prostate'")
    if config["frame"]["margin"]:
        raise ConfigError("frame.margin must be 0: each segmenter sees one image")
    for key in ("network", "augment"):
        given = config[f"moving_{key}"] or {}
        if set(given) - set(config[key]):
            raise ConfigError(f"unknown moving_{key} keys {sorted(set(given) - set(config[key]))}; known: {', '.join(sorted(config[key]))}")
        config[f"moving_{key}"] = {**config[key], **given}
    if config["moving_iterations"] is None:
        config["moving_iterations"] = config["iterations"]
    if not 0 < config["moving_iterations"] <= config["iterations"]:
        raise ConfigError(f"moving_iterations ({config['moving_iterations']}) must lie in 1..iterations ({config['iterations']})")
    return config


def of_role(config: dict, key: str, role: str):
    """`network`, `augment` or `iterations` of the ultrasound (`fixed`) segmenter, or their `moving_` forms for the MR's."""
    return config[key] if role == "fixed" else config[f"moving_{key}"]


@dataclass
class GlandLosses:
    fixed: float
    moving: float


class RoleImages:
    """One modality's distinct training images (standardised) and expert glands, each on its own grid."""

    def __init__(self):
        self.images, self.glands, self.grids = [], [], []

    def add(self, image, labels) -> None:
        self.images.append(torch.as_tensor(standardise(image).array, dtype=torch.float32)[None, None])
        self.glands.append(torch.as_tensor(data.binary_channels(labels).array[:1], dtype=torch.float32)[None])
        self.grids.append(Grid.of(image))

    def __len__(self) -> int:
        return len(self.images)


def distinct_images(pairs: list[data.Pair]):
    """`(role, image, labels)` of each distinct image of `pairs`, each pair read once (observations of one
    patient may share the MR file)."""
    seen = set()
    for pair in pairs:
        v = pair.load()
        for role in gl.ROLES:
            if (role, getattr(pair, role)) not in seen:
                seen.add((role, getattr(pair, role)))
                yield role, getattr(v, role), getattr(v, f"{role}_labels")


def role_images(pairs: list[data.Pair]) -> dict[str, RoleImages]:
    """Both modalities' distinct training images."""
    roles = {role: RoleImages() for role in gl.ROLES}
    for role, image, labels in distinct_images(pairs):
        roles[role].add(image, labels)
    return roles


@dataclass
class TrainingImages:
    """Both modalities' training images, and the split as the model card records it."""

    roles: dict[str, RoleImages]
    groups: dict[str, list[str]]
    train_ids: list[str]


def lr_at(config: dict, t: int, role: str = "fixed") -> float:
    """Cosine decay from `lr` to 0 over the segmenter's iterations."""
    return config["lr"] * 0.5 * (1 + math.cos(math.pi * t / max(of_role(config, "iterations", role), 1)))


def draw_batch(config: dict, t: int, sizes: dict[str, int], member: int = 0) -> dict:
    """Everything random in iteration `t` for one ensemble member, for the whole global batch and both modalities (same on every rank)."""
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + t + member * 7_919_000_003)
    b = config["batch_size"]
    draw = {}
    for role in gl.ROLES:
        a = of_role(config, "augment", role)
        angles = (torch.rand(b, 3, generator=g) * 2 - 1) * a["rotation_deg"]
        scale = 1 + (torch.rand(b, 3, generator=g) * 2 - 1) * a["scale"]
        shift = (torch.rand(b, 3, 1, generator=g) * 2 - 1) * a["shift_mm"]
        draw[role] = {
            "index": torch.randint(sizes[role], (b,), generator=g),
            "affine": torch.cat([rotation_matrix(angles) @ torch.diag_embed(scale), shift], dim=2),
            "gain": 1 + (torch.rand(b, generator=g) * 2 - 1) * a["gain"],
            "offset": torch.randn(b, generator=g) * a["offset"],
        }
    return draw


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (per sample, +1 smoothed) plus binary cross-entropy: Dice for the overlap, BCE for the edges."""
    p = torch.sigmoid(logits)
    dims = tuple(range(1, p.dim()))
    dice = 1 - (2 * (p * target).sum(dims) + 1) / (p.sum(dims) + target.sum(dims) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


class GlandsTrainer(TrainingRun):
    # the losses are the members' mean; the validation Dice, the ensemble's
    LOG_COLUMNS: ClassVar[list[str]] = ["iteration", "seconds", "lr", "fixed", "moving", "val_dice_fixed", "val_dice_moving"]

    def setup(self) -> None:
        c = self.config
        splits, train, groups = patient_split(c)
        self.data = TrainingImages(role_images(train), groups, [p.id for p in train])
        self.val = splits["val"]
        mf = c["moving_frame"]
        self.frames = {"fixed": self.frame, "moving": ModelFrame(tuple(mf["shape"]), mf["spacing"], 0)}
        self.card = gl.model_card(self.frames, {role: of_role(c, "network", role) for role in gl.ROLES}, MODALITIES)
        self.nets = {role: net.to(self.device) for role, net in gl.build_networks(self.card).items()}
        self.modules = dict(self.nets)
        self.optims = {role: torch.optim.Adam(net.parameters(), lr=c["lr"]) for role, net in self.nets.items()}
        self.nets_p = {role: self.wrap(net) for role, net in self.nets.items()}
        self.points = {role: f.canonical().points(device=self.device) for role, f in self.frames.items()}

    def _batch(self, role: str, draw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of one modality's drawn batch: augmented images and glands on the frame."""
        b = self.config["batch_size"] // self.world
        part = slice(self.rank * b, (self.rank + 1) * b)
        images, glands = [], []
        for i, affine, gain, offset in zip(draw["index"][part].tolist(), draw["affine"][part], draw["gain"][part], draw["offset"][part]):
            grid = self.data.roles[role].grids[i]
            model_pts = points_through(affine[None].to(self.device), self.points[role])[0]
            d = torch.as_tensor(grid.direction, dtype=torch.float32, device=self.device)
            pts = (model_pts @ d.T + torch.as_tensor(grid.center, dtype=torch.float32, device=self.device))[None]
            images.append(sample(self.data.roles[role].images[i].to(self.device), grid, pts) * gain + offset)
            glands.append(sample(self.data.roles[role].glands[i].to(self.device), grid, pts))
        return torch.cat(images), torch.cat(glands)

    def log_extra(self, t: int) -> dict:
        return {"lr": lr_at(self.config, t)}

    def step(self, t: int) -> GlandLosses:
        c = self.config
        sizes = {role: len(self.data.roles[role]) for role in gl.ROLES}
        members = {role: of_role(c, "network", role)["members"] for role in gl.ROLES}
        draws = [draw_batch(c, t, sizes, k) for k in range(max(members.values()))]
        out = {"fixed": math.nan, "moving": math.nan}  # a segmenter past its iterations logs no loss
        for role in gl.ROLES:
            if t >= of_role(c, "iterations", role):
                continue
            x, y = zip(*(self._batch(role, d[role]) for d in draws[: members[role]]))
            logits = self.nets_p[role](torch.stack(x), each=True)
            loss = sum(dice_bce(lk, yk) for lk, yk in zip(logits, y)) / members[role]
            opt = self.optims[role]
            for group in opt.param_groups:
                group["lr"] = lr_at(c, t, role)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out[role] = loss.item()
        return GlandLosses(**out)

    def validate(self) -> dict:
        """Mean gland Dice of each segmenter on the validation patients' images (thresholded at 0.5, on the image grid)."""
        model = gl.LoadedGlands(self.nets, self.card, self.device)
        for net in self.nets.values():
            net.eval()
        dice = {role: [] for role in gl.ROLES}
        for role, image, labels in distinct_images(self.val):
            truth = data.binary_channels(labels).channel(0)
            predicted = model.segment(image, role)
            dice[role].append(metrics.dice(truth, data.binary_channels(predicted).channel(0), labels=[1])[1])
        for net in self.nets.values():
            net.train()
        return {f"val_dice_{role}": float(np.mean(d)) if d else math.nan for role, d in dice.items()}

