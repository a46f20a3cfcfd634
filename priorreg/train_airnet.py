"""`priorreg train` for AIR-net (config `method: airnet`): generator and Wasserstein critic.

The loop, resume, checkpoints, logs and torchrun support are `train.TrainingRun`'s; this
module holds the data (training pairs in the model frame with their label-driven reference
alignments, `priorreg.reference`) and the step of `methods.airnet`'s docstring. Everything
random in iteration `t` is drawn from a generator seeded with `(seed, t)`.

At the end, the critic's D-score is calibrated to landmark TRE in mm on the validation
patients (`quality.calibrate`), and the calibration and verdict thresholds go into the card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import quality
from .methods import airnet as air
from .methods.adversarial import ModelFrame
from .reference import cached_reference
from .spatial import sample
from .train import SPLIT_DEFAULTS, ConfigError, TrainingRun, patient_split

DEFAULTS: dict = {
    "name": "airnet_mrus",
    "method": "airnet",
    "seed": 0,
    "device": "auto",
    "data": {
        "root": None,
        "task": "mrus_prostate",
        **SPLIT_DEFAULTS,
        "init": "centres",
        "limit": None,
    },
    "frame": {"shape": [24, 32, 24], "spacing": 3.0, "margin": 8},
    "network": {"width": 32, "dims": 3, "transform": "rigid"},
    # tre_weight > 0 adds PriorReg's error regression to the critic (methods.airnet.error_regression_loss),
    # rank_weight > 0 its ranking of known errors (methods.airnet.ranking_loss, pairs over rank_margin_mm apart); both fit
    # `target`: the landmark TRE, or the gland error (RMS over the fixed gland of the move from the reference alignment,
    # what the images show of an error). wasserstein: false drops the Wasserstein term: the critic is then the error
    # regression alone, impostors regressed to IMPOSTOR_ERROR_MM, and its D-score is minus an error in mm.
    # gp_fakes: "corrected" (the generator's fakes, as WGAN-GP) or "all" (perturbed pairs and impostors too)
    "critic": {"mode": "clip", "clip": 0.01, "gp_weight": 10.0, "n_critic": 2, "impostors": 0.25, "tre_weight": 0.0,
               "rank_weight": 0.0, "rank_margin_mm": 1.0, "gp_fakes": "corrected", "target": "landmarks", "wasserstein": True},  # fmt: skip
    "perturbation": {"rotation_deg": 25.0, "translation_mm": 5.0},
    "weights": {"adversarial": 1.0, "perturbation": 1.0},
    "iterations": 2000,
    "batch_size": 8,
    "lr": 1e-4,
    "checkpoint_every": 100,
    "validate_every": 250,
    "log_every": 10,
    "calibration": {"per_pair": 40, "seed": 1},
}


def check_config(config: dict) -> dict:
    if config["network"]["transform"] not in air.TRANSFORMS:
        raise ConfigError(f"network.transform must be one of {tuple(air.TRANSFORMS)}, got {config['network']['transform']!r}")
    if config["critic"]["gp_fakes"] not in ("corrected", "all"):
        raise ConfigError(f"critic.gp_fakes must be 'corrected' or 'all', got {config['critic']['gp_fakes']!r}")
    if config["critic"]["target"] not in ("landmarks", "gland"):
        raise ConfigError(f"critic.target must be 'landmarks' or 'gland', got {config['critic']['target']!r}")
    if not config["critic"]["wasserstein"] and config["critic"]["tre_weight"] <= 0:
        raise ConfigError("critic.wasserstein: false needs critic.tre_weight > 0 (the critic is then the error regression)")
    if config["critic"]["mode"] not in air.CRITICS:
        raise ConfigError(f"critic.mode must be one of {air.CRITICS}, got {config['critic']['mode']!r}")
    if config["data"]["task"] != "mrus_prostate":
        raise ConfigError(f"data.task {config['data']['task']!r}: the AIR-net trainer knows 'mrus_prostate'")
    return config


@dataclass
class AirnetLosses:
    critic: float
    generator: float
    perturbation: float
    d_real: float
    d_fake: float
    tre_fit: float
    rank_fit: float


IMPOSTOR_ERROR_MM = 20.0  # what a regression critic learns for an impostor: beyond every verdict threshold
GLAND_POINTS = 256  # gland voxels (of the fixed frame) whose move measures an alignment's gland error


class FramedPairs:
    """Pairs in the model frame: raw images, reference fields, landmark points, and gland points.

    `gland`: per pair, up to `GLAND_POINTS` fixed-frame gland voxel centres and where the reference
    alignment takes them, so that `candidate_tre` on them is the gland error of an alignment.
    """

    def __init__(self, pairs: list, frame: ModelFrame, init: str):
        self.ids = [p.id for p in pairs]
        fixed, moving, refs, glands = [], [], [], []
        fgrid = frame.canonical()
        every = fgrid.points(torch.float32).reshape(-1, 3)
        for pair in pairs:
            v = pair.load()
            f, m = air.frame_images(v.fixed, v.moving, frame, init)
            fixed.append(f)
            moving.append(m)
            refs.append(cached_reference(pair, frame, init))
            mask, _ = air.frame_images(v.fixed_labels.channel(0), v.moving, frame, init)
            inside = every[torch.as_tensor(mask.reshape(-1) > 0.5)]
            glands.append(inside[torch.linspace(0, len(inside) - 1, min(GLAND_POINTS, len(inside))).long()])
        self.fixed = torch.as_tensor(np.stack(fixed))
        self.moving = torch.as_tensor(np.stack(moving))
        self.ref = torch.cat([r.field for r in refs]).float()
        self.points = [(r.fixed_points, r.moving_points) for r in refs]
        eye = torch.eye(3, 4)[None]
        self.gland = [
            (g.numpy(), air.candidate_points(self.ref[i : i + 1], eye, fgrid, g[None])[0].numpy()) for i, g in enumerate(glands)
        ]

    def __len__(self) -> int:
        return len(self.ids)


class AirnetTrainer(TrainingRun):
    LOG_COLUMNS: ClassVar[list[str]] = [
        "iteration", "seconds", "critic", "generator", "perturbation", "d_real", "d_fake", "tre_fit", "rank_fit",
        "val_spearman", "val_auroc_5mm", "val_tre_before_mm", "val_tre_after_mm",
    ]  # fmt: skip

    def setup(self) -> None:
        c = self.config
        d = c["data"]
        splits, train, groups = patient_split(c)
        self.data = FramedPairs(train, self.frame, d["init"])
        self.data.groups = groups
        self.data.train_ids = self.data.ids
        self.val_pairs = splits["val"][: d["limit"]] if d["limit"] else splits["val"]
        self.val = FramedPairs(self.val_pairs, self.frame, d["init"]) if self.val_pairs else None
        n, p = c["network"], c["perturbation"]
        self.kind = n["transform"]
        self.scale = air.parameter_scale(self.kind, p["rotation_deg"], p["translation_mm"]).to(self.device)
        self.card = air.model_card(self.frame, n["width"], n["dims"], self.kind, d["init"], p)
        self.generator, self.critic = (m.to(self.device) for m in air.build_networks(self.card))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=c["lr"], betas=(0.5, 0.9))
        self.clipped = c["critic"]["mode"] == "clip" and c["critic"]["wasserstein"]  # a regression critic is never clipped
        if self.clipped:  # Arjovsky et al.: momentum-free RMSProp with clipping
            self.opt_c = torch.optim.RMSprop(self.critic.parameters(), lr=c["lr"])
        else:  # Gulrajani et al.
            self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=c["lr"], betas=(0.5, 0.9))
        self.modules = {"generator": self.generator, "critic": self.critic}
        self.optims = {"generator": self.opt_g, "critic": self.opt_c}
        self.generator_p, self.critic_p = self.wrap(self.generator), self.wrap(self.critic)

    # ------------------------------------------------------------------------------------ batches
    def _draw(self, g: torch.Generator) -> dict:
        """One global batch's randomness; this rank takes its slice."""
        c = self.config
        b = c["batch_size"]
        p = c["perturbation"]
        draw = {
            "pairs": torch.randint(len(self.data), (b,), generator=g),
            "params": air.random_perturbations(g, b, self.kind, p["rotation_deg"], p["translation_mm"]),
            "impostors": torch.randint(len(air.IMPOSTORS), (b,), generator=g),
            "use_impostor": torch.rand(b, generator=g) < c["critic"]["impostors"],
        }
        part = slice(self.rank * (b // self.world), (self.rank + 1) * (b // self.world))
        return {k: v[part] for k, v in draw.items()}

    def _warped(self, source: FramedPairs, idx: list, matrix: torch.Tensor) -> torch.Tensor:
        """Moving images of `source[idx]` warped by `ref o matrix`, standardised over the frame."""
        ref = source.ref[idx].to(self.device)
        pts = air.candidate_points(ref, matrix, self.fgrid, self.points)
        return air.standardise(sample(source.moving[idx].to(self.device), self.mgrid, pts))

    def _pair_batch(self, draw: dict) -> dict:
        idx = draw["pairs"].tolist()
        n = len(idx)
        eye = torch.eye(3, 4, device=self.device).expand(n, 3, 4)
        params = draw["params"].to(self.device)
        perturb = air.transform_matrix(params, self.kind)
        return {
            "idx": idx,
            "fixed": air.standardise(self.data.fixed[idx].to(self.device)),
            "aligned": self._warped(self.data, idx, eye),
            "params": params,
            "perturb": perturb,
            "perturbed": self._warped(self.data, idx, perturb),
        }

    def _correction(self, batch: dict, estimate: torch.Tensor) -> torch.Tensor:
        """`P o P_hat^-1`: what the moving image is warped by (after `ref`) once the generator corrected it."""
        return air.then(air.invert(air.transform_matrix(estimate, self.kind)), batch["perturb"])

    def _tre(self, batch: dict, matrix: torch.Tensor) -> torch.Tensor:
        """The error (mm) of `ref o matrix` for each sample of the batch: landmark TRE or gland error (`critic.target`)."""
        points = self.data.gland if self.config["critic"]["target"] == "gland" else self.data.points
        out = []
        for k, i in enumerate(batch["idx"]):
            fp, mp = points[i]
            ref = self.data.ref[i : i + 1].to(self.device)
            out.append(air.candidate_tre(ref, matrix[k : k + 1], self.fgrid, fp, mp))
        return torch.cat(out).to(self.device)

    # --------------------------------------------------------------------------------------- step
    def step(self, t: int) -> AirnetLosses:
        c = self.config
        cc = c["critic"]
        g = torch.Generator().manual_seed(c["seed"] * 1_000_003 + t)
        for _ in range(cc["n_critic"]):
            draw = self._draw(g)
            batch = self._pair_batch(draw)
            with torch.no_grad():
                correction = self._correction(batch, self.generator_p(batch["fixed"], batch["perturbed"]))
                corrected = self._warped(self.data, batch["idx"], correction)
            fake_f = [batch["fixed"], batch["fixed"]]
            fake_w = [corrected, batch["perturbed"]]
            for i in torch.nonzero(draw["use_impostor"]).flatten().tolist():
                kind = air.IMPOSTORS[int(draw["impostors"][i])]
                f, w = air.impostor(kind, batch["fixed"][i : i + 1], batch["aligned"][i : i + 1])
                fake_f.append(f)
                fake_w.append(w)
            real = (batch["fixed"], batch["aligned"])
            fake = (torch.cat(fake_f), torch.cat(fake_w))
            if cc["wasserstein"]:
                loss_c, d_real, d_fake = air.critic_loss(self.critic_p, real, fake, cc["mode"], cc["gp_weight"], cc["gp_fakes"])
            else:
                d_real, d_fake = self.critic_p(*real)[:, 0], self.critic_p(*fake)[:, 0]
                loss_c = d_real.new_zeros(())
            tre_fit = rank_fit = torch.zeros(())
            if cc["tre_weight"] > 0 or cc["rank_weight"] > 0:  # real, corrected and perturbed pairs have known errors
                n = len(batch["idx"])
                eye = torch.eye(3, 4, device=self.device).expand(n, 3, 4)
                tre = torch.cat([self._tre(batch, m) for m in (eye, correction, batch["perturb"])])
                known = torch.cat([d_real, d_fake[: 2 * n]])
                if cc["tre_weight"] > 0:
                    if cc["wasserstein"]:
                        tre_fit = air.error_regression_loss(known, tre)
                    else:  # the regression is the critic: impostors too, at an error no verdict calls good
                        impostors = torch.full_like(d_fake[2 * n :], IMPOSTOR_ERROR_MM)
                        tre_fit = air.error_regression_loss(torch.cat([known, d_fake[2 * n :]]), torch.cat([tre, impostors]))
                    loss_c = loss_c + cc["tre_weight"] * tre_fit
                if cc["rank_weight"] > 0:
                    rank_fit = air.ranking_loss(known, tre, cc["rank_margin_mm"])
                    loss_c = loss_c + cc["rank_weight"] * rank_fit
            self.opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            self.opt_c.step()
            if self.clipped:
                air.clip_weights(self.critic, cc["clip"])
        batch = self._pair_batch(self._draw(g))
        estimate = self.generator_p(batch["fixed"], batch["perturbed"])
        self.critic.requires_grad_(False)
        corrected = self._warped(self.data, batch["idx"], self._correction(batch, estimate))
        adversarial = -self.critic_p(batch["fixed"], corrected).mean()
        self.critic.requires_grad_(True)
        perturbation = air.perturbation_loss(estimate, batch["params"], self.scale)
        w = c["weights"]
        loss_g = w["adversarial"] * adversarial + w["perturbation"] * perturbation
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return AirnetLosses(
            loss_c.item(), adversarial.item(), perturbation.item(), d_real.mean().item(), d_fake.mean().item(), tre_fit.item(),
            rank_fit.item(),
        )

    # --------------------------------------------------------------------------------- validation
    def validate(self) -> dict:
        """Score-TRE agreement and the generator's correction on fixed perturbations of the validation pairs."""
        if self.val is None:
            return {}
        self.generator.eval()
        self.critic.eval()
        e = known_error_evaluation(self.generator, self.critic, self.card, self.val, per_pair=16, seed=12345, device=self.device)
        self.generator.train()
        self.critic.train()
        return {
            "val_spearman": e["spearman"],
            "val_auroc_5mm": e["auroc"],
            "val_tre_before_mm": e["tre_before_mm"],
            "val_tre_after_mm": e["tre_after_mm"],
        }

    def save_model(self, last: dict) -> None:
        """The model, then its calibration on the validation patients written into its card."""
        super().save_model(last)
        if self.val_pairs:
            path = self.out / f"{self.config['name']}.safetensors"
            cal = self.config["calibration"]
            quality.calibrate(path, self.val_pairs, cal["per_pair"], cal["seed"])



def known_error_evaluation(generator, critic, card: dict, pairs: FramedPairs, per_pair: int, seed: int, device, passes: int = 1) -> dict:
    """Seeded perturbations of each pair's reference alignment (the card's ranges), in the model frame:
    the critic's agreement with their landmark TRE, and the TRE before and after the generator's
    correction (`passes` times), as the paper evaluates (section 3.2)."""
    f = card["frame"]
    frame = ModelFrame(tuple(f["shape"]), f["spacing"], f["margin"])
    fgrid, mgrid = frame.canonical(), frame.canonical(moving=True)
    points = fgrid.points(device=device)
    kind, p = card["architecture"]["transform"], card["perturbation"]
    g = torch.Generator().manual_seed(seed)
    scores, before, after = [], [], []
    with torch.no_grad():
        for i in range(len(pairs)):
            params = air.random_perturbations(g, per_pair, kind, p["rotation_deg"], p["translation_mm"]).to(device)
            matrix = air.transform_matrix(params, kind)
            ref = pairs.ref[i : i + 1].to(device)
            fixed = air.standardise(pairs.fixed[[i] * per_pair].to(device))
            moving = pairs.moving[[i] * per_pair].to(device)
            refs = ref.expand(per_pair, -1, -1, -1, -1)
            current = air.standardise(sample(moving, mgrid, air.candidate_points(refs, matrix, fgrid, points)))
            scores.append(critic(fixed, current)[:, 0].cpu())
            fp, mp = pairs.points[i]
            before.append(air.candidate_tre(ref, matrix, fgrid, fp, mp).cpu())
            for _ in range(passes):
                matrix = air.then(air.invert(air.transform_matrix(generator(fixed, current), kind)), matrix)
                current = air.standardise(sample(moving, mgrid, air.candidate_points(refs, matrix, fgrid, points)))
            after.append(air.candidate_tre(ref, matrix, fgrid, fp, mp).cpu())
    s, b, a = (torch.cat(x).numpy() for x in (scores, before, after))
    return {**quality.agreement(s, b), "tre_before_mm": float(np.nanmean(b)), "tre_after_mm": float(np.nanmean(a)), "n_samples": len(s)}
