"""`priorreg train` for Deform-GAN (config `method: deformgan`, seed 002), and its VoxelMorph-LG baseline.

The loop, resume, checkpoints and logs are `train.TrainingRun`'s; this module holds the data and
the step. Section 2.1's training by turns: every iteration takes one Adam step on T, then one
on G, then one on D, each with the other two frozen (`requires_grad` off, so they collect no
gradient; T's loss still back-propagates *through* the frozen G). `loss.gan: false` trains T
alone on the local gradient loss: the paper's VoxelMorph-LG, from the same script.

Data, as section 3.1 on BraTS: co-registered T1 / T2 / FLAIR sets deformed by random shift,
rotation, scaling and elastic deformation of known ground truth (`known_deformations`). The
sets of `known_deformations.SPLIT["train"]` are framed once (the model frame, with the moving
margin, around each set's centre along its direction); every iteration draws, seeded with
`(seed, t)`, per pair a set, a fixed modality (T2 or FLAIR) and a deformation on the frame:
fixed = reference(x + u(x)), moving = T1 (T1pre for the tumour studies), as in
`known_deformations` (so `u` is the true answer, logged as the batch's `epe_mm`). Training
never sees `SPLIT["test"]`; validation scores fresh deformations (seed `data.val_seed`) of the
training sets, since there is no third patient to spare.

`data.init: affine` trains T for use after a mutual-information affine (`methods.deformgan`): the
frames stay centred on each set, and `augment` should then hold what an affine leaves (small
rotation, scaling and shift, the elastic part), not the whole deformation. Validation registers
its full-size pairs as users will: the affine first, then T.

Single process only: the turns switch `requires_grad`, which DistributedDataParallel forbids.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from . import data
from . import known_deformations as kd
from .evaluate import known_field_metrics, summarise
from .jacobian import jacobian_stats
from .methods import deformgan as dg
from .methods.adversarial import ModelFrame
from .spatial import Grid
from .train import ConfigError, TrainingRun
from .volume import Volume

DEFAULTS: dict = {
    "name": "deformgan_brain",
    "method": "deformgan",
    "seed": 0,
    "device": "auto",
    "data": {
        "root": None,
        "task": "brain_t1t2",
        "val_pairs": 2,  # validate on the first N known pairs of the training sets (0: none)
        "val_seed": 1,  # their deformation seed (`known_deformation_pairs`); 0 is evaluate's default
        "val_max_voxels": 200_000,  # their working grid
        # The pre-alignment at inference (the card's preprocessing.init): "centres", or "affine" (T learns what a
        # mutual-information affine leaves: train it on residual-sized `augment` magnitudes).
        "init": "centres",
    },
    # 4 mm isotropic, 144 x 224 x 224 mm: the tumour studies' whole field of view; margin for warping
    "frame": {"shape": [36, 56, 56], "spacing": 4.0, "margin": 4},
    "network": {"transform": [16, 32, 32, 32], "generator": [16, 32, 32, 32], "discriminator": [16, 32, 64], "output_scale_mm": 10.0},
    # similarity: T's direct term, the paper's local_gradient or lncc (dg.DIRECT_SIMILARITIES)
    "loss": {"gan": True, "similarity": "local_gradient", "weights": dict(dg.WEIGHTS), "window": dg.WINDOW},
    "augment": asdict(kd.DEFAULTS),  # the deformations' magnitudes (known_deformations.Magnitudes)
    "iterations": 1000,
    "batch_size": 1,
    "lr": 1e-4,  # section 3.3: Adam, 1e-4, for all three networks
    "checkpoint_every": 100,
    "validate_every": 250,
    "log_every": 10,
}


def check_config(config: dict) -> dict:
    if config["data"]["task"] != "brain_t1t2":
        raise ConfigError(f"data.task {config['data']['task']!r}: the Deform-GAN trainer knows 'brain_t1t2'")
    if set(config["loss"]["weights"]) != set(dg.WEIGHTS):
        raise ConfigError(f"loss.weights needs exactly {sorted(dg.WEIGHTS)}, got {sorted(config['loss']['weights'])}")
    if config["data"]["init"] not in ("centres", "affine"):
        raise ConfigError(f"data.init must be 'centres' or 'affine', got {config['data']['init']!r}")
    if config["loss"]["similarity"] not in dg.DIRECT_SIMILARITIES:
        raise ConfigError(f"loss.similarity must be one of {list(dg.DIRECT_SIMILARITIES)}, got {config['loss']['similarity']!r}")
    if not isinstance(config["loss"]["gan"], bool):
        raise ConfigError(f"loss.gan must be true or false, got {config['loss']['gan']!r}")
    if config["frame"]["margin"] < 0 or any(s < 8 for s in config["frame"]["shape"]):
        raise ConfigError("frame.shape needs at least 8 voxels per axis and frame.margin must be >= 0")
    return config


@dataclass
class DeformGANLosses:
    loss: float  # T's total
    similarity: float  # T's direct term (loss.similarity), before its weight beta
    smoothness: float
    epe_mm: float  # the batch's end-point error against its known deformation, over the fixed head
    lncc: float = math.nan
    g_loss: float = math.nan
    g_gan: float = math.nan
    g_local_gradient: float = math.nan
    g_l1: float = math.nan
    d_loss: float = math.nan
    d_real: float = math.nan
    d_fake: float = math.nan


def crop_margin(moving_big: torch.Tensor, margin: int) -> torch.Tensor:
    """The moving image on the fixed frame, from its framing with the margin (same centre and spacing)."""
    m = margin
    return moving_big[..., m:-m, m:-m, m:-m] if m else moving_big


class FramedSets:
    """Each training set's moving image and both references on the frame with its margin, `[N, 1, ...]`."""

    def __init__(self, names, root, frame: ModelFrame):
        sets = data.multimodal_sets(root)
        missing = [n for n in names if n not in sets]
        if missing:
            raise ConfigError(f"training sets {missing} not found under the data root (found {sorted(sets)})")
        self.ids = list(names)
        images: dict[str, list] = {"moving": [], "T2": [], "FLAIR": []}
        for name in self.ids:
            files = sets[name]
            reference = Volume.read(files["T2"])
            grid = Grid.of(reference)
            moving = Volume.read(files[kd.MOVING[name.split("_")[0]]])
            sources = {"moving": moving, "T2": reference, "FLAIR": Volume.read(files["FLAIR"])}
            for role, image in sources.items():
                images[role].append(dg.framed(image, frame, grid.center, grid.direction, moving=True)[0])
        self.moving = torch.stack(images["moving"])
        self.references = torch.stack([torch.stack(images["T2"]), torch.stack(images["FLAIR"])])  # [2, N, 1, ...]

    def __len__(self) -> int:
        return len(self.ids)


def draw_batch(config: dict, t: int, n_sets: int) -> dict:
    """Everything random in iteration `t`: per pair a set, a reference (0 T2, 1 FLAIR), a deformation seed."""
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + t)
    b = config["batch_size"]
    return {
        "sets": torch.randint(n_sets, (b,), generator=g),
        "references": torch.randint(2, (b,), generator=g),
        "seeds": torch.randint(2**31 - 1, (b,), generator=g),
    }


class DeformGANTrainer(TrainingRun):
    LOG_COLUMNS: ClassVar[list[str]] = [
        "iteration", "seconds", "loss", "similarity", "lncc", "smoothness", "epe_mm",
        "g_loss", "g_gan", "g_local_gradient", "g_l1", "d_loss", "d_real", "d_fake",
        "val_epe_mm", "val_rmse", "val_folding_pct",
    ]  # fmt: skip

    def setup(self) -> None:
        if self.world > 1:
            raise ConfigError("the Deform-GAN trainer runs in one process (its turns switch requires_grad, which DDP forbids)")
        c = self.config
        d = c["data"]
        self.data = FramedSets(kd.SPLIT["train"], d["root"], self.frame)
        self.data.groups = {k: list(v) for k, v in kd.SPLIT.items()}
        self.data.train_ids = self.data.ids
        self.val_pairs = []
        if d["val_pairs"]:
            pairs = kd.known_deformation_pairs(d["root"], n=d["val_pairs"], seed=d["val_seed"], max_voxels=d["val_max_voxels"])
            self.val_pairs = [p for p in pairs if p.group in kd.SPLIT["train"]][: d["val_pairs"]]
        self.gan = c["loss"]["gan"]
        self.card = dg.model_card(self.frame, c["network"], self.gan, d["init"])
        self.modules = dg.build_networks(self.card)
        for module in self.modules.values():
            module.to(self.device)
        self.optims = {name: torch.optim.Adam(m.parameters(), lr=c["lr"]) for name, m in self.modules.items()}
        self.grid = self.frame.canonical()

    def batch(self, draw: dict) -> dict:
        """Fixed, moving (on the frame), moving with the margin and the true field, on the device."""
        augment = self.config["augment"]
        fixed, u = [], []
        for s, r, seed in zip(draw["sets"].tolist(), draw["references"].tolist(), draw["seeds"].tolist()):
            true = torch.as_tensor(kd.random_deformation(self.grid, seed, **augment).array)[None]
            fixed.append(dg.warp_in_frame(self.data.references[r, s][None], true, self.frame))
            u.append(true)
        moving_big = self.data.moving[draw["sets"]]
        dev = self.device
        return {
            "fixed": torch.cat(fixed).to(dev),
            "moving": crop_margin(moving_big, self.frame.margin).to(dev),
            "moving_big": moving_big.to(dev),
            "true_field": torch.cat(u).to(dev),
        }

    def turn(self, name: str) -> None:
        """Only network `name` collects gradients (and only its optimizer steps)."""
        for key, module in self.modules.items():
            module.requires_grad_(key == name)

    def transform_turn(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One step of T (G and D frozen); returns the field and F(phi) (detached) and the logged parts."""
        c = self.config
        self.turn("transform")
        u = dg.displacement(self.modules["transform"], batch["fixed"], batch["moving"], self.card["architecture"]["output_scale_mm"])
        warped = dg.warp_in_frame(batch["moving_big"], u, self.frame)
        synthesized = self.modules["generator"](warped) if self.gan else None
        loss, parts = dg.transform_loss(
            batch["fixed"], warped, synthesized, u, self.grid, c["loss"]["weights"], c["loss"]["window"], c["loss"]["similarity"]
        )
        self._step("transform", loss)
        return u.detach(), warped.detach(), {"loss": loss.item(), **parts}

    def generator_turn(self, batch: dict, warped: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One step of G (T and D frozen) on F(phi); returns G's output (detached) and the logged parts."""
        c = self.config
        self.turn("generator")
        synthesized = self.modules["generator"](warped)
        loss, parts = dg.generator_loss(
            self.modules["discriminator"], warped, synthesized, batch["fixed"], self.grid, c["loss"]["weights"], c["loss"]["window"]
        )
        self._step("generator", loss)
        return synthesized.detach(), {"g_loss": loss.item(), **parts}

    def discriminator_turn(self, batch: dict, warped: torch.Tensor, synthesized: torch.Tensor) -> dict:
        """One step of D (T and G frozen): the fixed image real, G's output fake."""
        self.turn("discriminator")
        loss, parts = dg.discriminator_loss(self.modules["discriminator"], warped, synthesized, batch["fixed"])
        self._step("discriminator", loss)
        return parts

    def _step(self, name: str, loss: torch.Tensor) -> None:
        opt = self.optims[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step(self, t: int) -> DeformGANLosses:
        batch = self.batch(draw_batch(self.config, t, len(self.data)))
        u, warped, parts = self.transform_turn(batch)
        if self.gan:
            synthesized, g_parts = self.generator_turn(batch, warped)
            parts.update(g_parts, **self.discriminator_turn(batch, warped, synthesized))
        head = batch["fixed"][:, 0] > kd.FOREGROUND_FRACTION  # about evaluate's mask: intensities are 1st-99th percentile
        parts["epe_mm"] = (u - batch["true_field"]).norm(dim=1)[head].mean().item()
        return DeformGANLosses(**parts)

    def validate(self) -> dict:
        """EPE (mm, over the head), RMSE and folding on fresh deformations of the training sets."""
        if not self.val_pairs:
            return {}
        transform = self.modules["transform"]
        transform.eval()
        model = dg.LoadedDeformGAN(transform, self.card, self.device)
        rows = []
        with torch.no_grad():
            for pair in self.val_pairs:
                v = pair.load()
                field = dg.register_deformgan(v.fixed, v.moving, loaded=model).field
                rows.append(
                    known_field_metrics(field, v.true_field, v.moving, v.mask)
                    | {"folding_pct": float(jacobian_stats(field)["folding_pct"])}
                )
        transform.train()
        s = summarise(rows)
        return {
            "val_epe_mm": s.get("epe_mm", math.nan),
            "val_rmse": s.get("rmse", math.nan),
            "val_folding_pct": s.get("folding_pct", math.nan),
        }

    def training_card(self, last: dict) -> dict:
        card = super().training_card(last)
        card["train_sets"] = card.pop("train_pairs")  # pairs are deformed anew every iteration
        card["split"] = card.pop("patients")
        card["data"] = "brain_multimodal (shared data): known deformations of co-registered T1 -> T2 / FLAIR sets"
        card["validation"] = [p.id for p in self.val_pairs]
        return card
