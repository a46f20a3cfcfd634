"""`priorreg train CONFIG.yaml`: seeded, resumable, data-parallel training (the adversarial method here;
`method: airnet`, `method: symmetric`, `method: deformgan`, `method: glands` and `method: segreg` configs go
to `train_airnet.py`, `train_symmetric.py`, `train_deformgan.py`, `train_glands.py` and `train_segreg.py`).

- The config is YAML over `DEFAULTS` (unknown keys are an error, not a silent default).
- Reproducible: the networks are initialised from `seed`, and everything random in
  iteration `t` (pairs, label channel, augmentation affines, simulated fields) is drawn
  from a generator seeded with `(seed, t)`. A resumed run therefore continues exactly
  as an uninterrupted one, and every process of a torchrun job draws the same global
  batch and takes its own slice of it.
- Checkpoints (`checkpoint.safetensors`: both networks and both Adam states) are written
  atomically every `checkpoint_every` iterations; a killed run resumes from the last one
  and truncates `log.csv` to it. TensorBoard scalars go to `tensorboard/` when the
  `tensorboard` package is installed.
- Data-parallel: under `torchrun --nproc_per_node N`, both networks are wrapped in
  DistributedDataParallel (gloo on CPU, NCCL on CUDA); `batch_size` is the global batch
  and must divide by N. Only rank 0 writes files.
- The result is `<out>/<name>.safetensors` with its model card `<name>.json`.
"""

from __future__ import annotations

import copy
import csv
import importlib
import math
import os
import sys
import time
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from . import data, losses
from .evaluate import pair_metrics, summarise
from .methods import adversarial as adv
from .methods.common import pick_device
from .models import load_checkpoint, save_checkpoint, save_model
from .registration import Cancelled
from .spatial import Grid, field_tensor, read_field, sample
from .volume import READ_SUFFIXES

# The patient split every trainer cuts its data with (`patient_split`; the hippocampus trainer's
# `data.split_groups`): the fractions and seed `priorreg evaluate --split` uses, so that no model
# is scored on patients it trained on.
SPLIT_DEFAULTS = {"val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0}
DEFAULTS: dict = {
    "name": "adversarial_mrus",
    "method": "adversarial",
    "seed": 0,
    "device": "auto",
    "data": {
        "root": None,  # shared data folder (default $PRIORREG_DATA or ../shared/data), or the user's folder of pairs
        "task": "mrus_prostate",  # or "folder": your own pairs in `root` (priorreg.data.folder_pairs says the layout)
        **SPLIT_DEFAULTS,
        "labels": "gland",  # "gland" (the paper's M_n = 1) or "all" (gland and landmarks, one drawn per pair)
        "init": "centres",
        "limit": None,  # use only the first N training pairs (tests)
    },
    "frame": {"shape": [24, 32, 24], "spacing": 3.0, "margin": 8},  # spacing "auto": the frame covers every fixed image
    "network": {"n0": 8, "depth": 3},
    "regularizer": "adversarial",  # adversarial | bending | l2 | none
    "weight": None,  # lambda_adv (default 0.01) or the smoothness weight (default 0.5)
    "simulations": None,  # folder of displacement-field images (priorreg simulate, NiftySim, FEBio, ...)
    "gamma": [0.2, 0.05],  # distribution smoothing, annealed exponentially from the first to the second
    "augment": {"matrix": 0.05, "shift_mm": 5.0},
    "iterations": 2000,
    "batch_size": 4,
    "lr": 1e-4,
    "checkpoint_every": 100,
    "validate_every": 250,
    "log_every": 10,
}
DEFAULT_WEIGHTS = {"adversarial": 0.01, "bending": 0.5, "l2": 0.5, "none": 0.0}
FIELD_SUFFIXES = (*READ_SUFFIXES, ".h5")


class ConfigError(ValueError):
    """A config file that cannot be trained from; the message says which key and why."""


def check_frame_levels(config: dict) -> int:
    """The U-Net's number of stride-2 levels (`network.channels`); `frame.shape` must halve that often."""
    levels = len(config["network"]["channels"]) - 1
    if any(s % 2**levels for s in config["frame"]["shape"]):
        raise ConfigError(f"frame.shape {config['frame']['shape']} must divide by 2**{levels} (network.channels has {levels + 1} levels)")
    return levels


def _merge(defaults: dict, given: dict, where: str = "") -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(f"unknown config key '{where}{key}'; known: {', '.join(sorted(defaults))}")
        out[key] = _merge(defaults[key], value, f"{where}{key}.") if isinstance(defaults[key], dict) else value
    return out


TRAINERS = ("airnet", "symmetric", "deformgan", "glands", "segreg")  # `method:` values with a module train_<method>; adversarial's is here
COUNTS = {"iterations": 0, "batch_size": 1, "checkpoint_every": 1, "log_every": 1, "members": 1, "validate_every": 0}  # key: least value
RATES = ("lr", "lr_final")  # above 0 (lr_final: the end of a decay from lr; None or absent: no decay)


def check_numbers(config: dict) -> dict:
    """The counts and learning rates every trainer shares, checked before any work.

    A negative count or learning rate would train nothing or train away from the data, with no
    error; a string would fail deep in the loop. (`iterations` 0 writes the untrained networks,
    a control; `validate_every` 0 never validates.)
    """
    for key, least in COUNTS.items():
        value = config.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key} must be a whole number, {least} or more; got {value!r}")
    for key in RATES:
        value = config.get(key)
        if value is None and key != "lr":
            continue
        if isinstance(value, str):  # YAML reads `lr: 1e-4` (no dot) as a string
            try:
                value = config[key] = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key} must be a number above 0; got {value!r}")
    return config


def load_config(path: str | os.PathLike | None = None, **overrides) -> dict:
    """The method's defaults (`method:`, adversarial by default) updated by the YAML file, then by `overrides`."""
    given = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    method = given.get("method", "adversarial")
    if method in TRAINERS:
        trainer = importlib.import_module(f".train_{method}", __package__)
        return trainer.check_config(check_numbers(_merge(trainer.DEFAULTS, {**given, **overrides})))
    if method != "adversarial":
        raise ConfigError(f"method must be 'adversarial', {', '.join(map(repr, TRAINERS[:-1]))} or {TRAINERS[-1]!r}, got {method!r}")
    return _load_adversarial({**given, **overrides})


def _load_adversarial(given: dict) -> dict:
    """The adversarial trainer's config: DEFAULTS updated by `given`, its own keys checked."""
    config = check_numbers(_merge(DEFAULTS, given))
    if config["regularizer"] not in adv.REGULARIZERS:
        raise ConfigError(f"regularizer must be one of {adv.REGULARIZERS}, got {config['regularizer']!r}")
    if config["weight"] is None:
        config["weight"] = DEFAULT_WEIGHTS[config["regularizer"]]
    if config["regularizer"] == "adversarial" and not config["simulations"]:
        raise ConfigError("regularizer 'adversarial' needs 'simulations': a folder of displacement fields (priorreg simulate)")
    if config["data"]["labels"] not in ("gland", "all"):
        raise ConfigError(f"data.labels must be 'gland' or 'all', got {config['data']['labels']!r}")
    if config["data"]["task"] not in ("mrus_prostate", "folder"):
        raise ConfigError(f"data.task {config['data']['task']!r}: this trainer knows 'mrus_prostate' and 'folder'")
    if config["data"]["task"] == "folder" and not config["data"]["root"]:
        raise ConfigError("data.task 'folder' needs data.root: the folder of pairs (one subfolder per pair)")
    if config["frame"]["spacing"] == "auto":
        config["frame"]["spacing"] = covering_spacing(training_pairs(config), config["frame"]["shape"])
    return config


def folder_config(folder, name: str, iterations: int = 2000, regularizer: str = "bending", simulations=None, device: str = "auto") -> dict:
    """The adversarial trainer's config for a user's folder of pairs (`data.folder_pairs`), as the Slicer module runs it.

    Every label structure takes turns driving training (`labels: all`); a fifth of the patients
    is held out for validation Dice and none for a test split (the user's own evaluation is
    theirs); the frame keeps its shape and takes the spacing that covers the largest fixed image.
    """
    return load_config(
        None, name=name, iterations=iterations, regularizer=regularizer, simulations=simulations, device=device,
        data={"task": "folder", "root": str(folder), "labels": "all", "val_fraction": 0.2, "test_fraction": 0.0},
        frame={"spacing": "auto"},
    )


def training_pairs(config: dict) -> list[data.Pair]:
    """Every pair of the config's data set, before the split."""
    d = config["data"]
    try:
        return data.folder_pairs(d["root"]) if d["task"] == "folder" else data.mrus_pairs(d["root"])
    except (OSError, ValueError) as error:
        raise ConfigError(f"data: {error}") from error


def covering_spacing(pairs: list[data.Pair], shape) -> float:
    """The finest frame spacing (mm, rounded up to 0.1) at which a `shape` frame covers every fixed image.

    The frame is centred on the fixed image and follows its axes, so it must span the largest
    fixed field of view along each axis; a frame that crops the images trains on part of them.
    """
    need = 0.0
    for pair in pairs:
        reader = sitk.ImageFileReader()  # the header only: the training set reads the voxels later
        reader.SetFileName(str(pair.fixed))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise ConfigError(f"{pair.fixed}: cannot be read as an image ({str(error).strip().splitlines()[-1]})") from None
        extent = np.array(reader.GetSpacing()[:3]) * (np.array(reader.GetSize()[:3]) - 1)  # (i, j, k) in mm
        need = max(need, float(np.max(extent / (np.array(shape[::-1], dtype=np.float64) - 1))))
    return math.ceil(need * 10) / 10


# ----------------------------------------------------------------------------------------- data
class PatientSplit(NamedTuple):
    """A config's pairs split by patient: every split, the training pairs used, and each split's patients (for the card)."""

    splits: dict[str, list[data.Pair]]
    train: list[data.Pair]
    groups: dict[str, list[str]]


def patient_split(config: dict) -> PatientSplit:
    """`data.split_by_patient` with the config's fractions and seed; the training pairs cut to `data.limit` (tests)."""
    d = config["data"]
    splits = data.split_by_patient(training_pairs(config), d["val_fraction"], d["test_fraction"], d["split_seed"])
    train = splits["train"][: d["limit"]] if d["limit"] else splits["train"]
    if not train:
        raise ConfigError("no training pairs: check data.root and the split fractions")
    return PatientSplit(splits, train, {name: sorted({g for p in pairs for g in p.groups}) for name, pairs in splits.items()})


class TrainingSet:
    """The training pairs in the model frame (tensors), and the validation pairs as Volumes."""

    def __init__(self, config: dict, frame: adv.ModelFrame):
        d = config["data"]
        splits, train, self.groups = patient_split(config)
        self.train_ids = [p.id for p in train]
        framed = []
        for pair in train:
            v = pair.load()
            framed.append(adv.frame_pair(v.fixed, v.moving, frame, d["init"], v.fixed_labels, v.moving_labels))
        self.fixed = torch.as_tensor(np.stack([f["fixed"] for f in framed]))
        self.moving = torch.as_tensor(np.stack([f["moving"] for f in framed]))
        self.fixed_labels = [torch.as_tensor(f["fixed_labels"]) for f in framed]
        self.moving_labels = [torch.as_tensor(f["moving_labels"]) for f in framed]
        self.val = splits["val"]

    def __len__(self) -> int:
        return len(self.train_ids)


def load_simulations(folder, frame: adv.ModelFrame) -> torch.Tensor:
    """Every displacement field in `folder` in model coordinates `[S, 3, K, J, I]` (mm).

    Each field is framed like a fixed image: the model grid centred on the field's own
    field of view, along its direction; vectors are rotated into the model axes.
    """
    # Names starting with a dot are the simulator's unfinished temporary files.
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith(FIELD_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"simulations: no displacement-field images ({', '.join(FIELD_SUFFIXES)}) in {folder}")
    out = []
    for path in files:
        field = read_field(path)
        grid = Grid.of(field)
        target = frame.physical(grid.center, grid.direction)
        u = sample(field_tensor(field, torch.float64), grid, target.points(torch.float64)[None], padding="border")
        out.append(torch.einsum("ba,nbkji->nakji", torch.as_tensor(grid.direction), u)[0].float())
    return torch.stack(out)


def random_affines(g: torch.Generator, n: int, matrix: float, shift_mm: float) -> torch.Tensor:
    """`[n, 3, 4]` maps `x -> A x + t` near identity: entries of A within +-matrix, t within +-shift."""
    a = torch.eye(3) + (torch.rand(n, 3, 3, generator=g) * 2 - 1) * matrix
    t = (torch.rand(n, 3, 1, generator=g) * 2 - 1) * shift_mm
    return torch.cat([a, t], dim=2)


def draw_batch(config: dict, t: int, n_pairs: int, n_labels: list[int], n_sims: int) -> dict:
    """Everything random in iteration `t`, for the whole global batch (same on every rank)."""
    g = torch.Generator().manual_seed(config["seed"] * 1_000_003 + t)
    b = config["batch_size"]
    idx = torch.randint(n_pairs, (b,), generator=g)
    aug = config["augment"]
    draw = {
        "pairs": idx,
        "fixed_affine": random_affines(g, b, aug["matrix"], aug["shift_mm"]),
        "moving_affine": random_affines(g, b, aug["matrix"], aug["shift_mm"]),
    }
    if config["data"]["labels"] == "all":
        draw["channels"] = torch.tensor([int(torch.randint(n_labels[i], (1,), generator=g)) for i in idx.tolist()])
    else:
        draw["channels"] = torch.zeros(b, dtype=torch.long)
    if n_sims:
        draw["simulations"] = torch.randint(n_sims, (b,), generator=g)
    return draw


def gamma_at(config: dict, t: int) -> float:
    """Exponential annealing from gamma[0] at the first iteration to gamma[1] at the last."""
    g0, g1 = config["gamma"]
    return g0 * (g1 / g0) ** (t / max(config["iterations"] - 1, 1)) if g0 > 0 else 0.0


# ------------------------------------------------------------------------------------- training
class TrainingRun:
    """The loop every trainer shares: processes, resume, logs, checkpoints, the model file.

    A subclass builds its networks in `setup()` (filling `modules`, `optims`, `card`, and
    `data.groups` / `data.train_ids`), and defines `step(t)` (returning a dataclass of
    floats, logged as columns), `validate()` and `LOG_COLUMNS`.
    """

    LOG_COLUMNS: ClassVar[list[str]] = []

    def __init__(self, config: dict, out: str | os.PathLike, progress=None, cancel=None):
        self.config, self.out, self.progress, self.cancel = config, Path(out), progress, cancel
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if config["batch_size"] % self.world:
            raise ConfigError(f"batch_size {config['batch_size']} must divide by the {self.world} processes")
        self.device = pick_device(config["device"])
        self.owns_group = self.world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        f = config["frame"]
        self.frame = adv.ModelFrame(tuple(f["shape"]), f["spacing"], f["margin"])
        self.fgrid, self.mgrid = self.frame.canonical(), self.frame.canonical(moving=True)
        self.points = self.fgrid.points(device=self.device)  # every iteration samples at these
        torch.manual_seed(config["seed"])
        self.modules: dict = {}
        self.optims: dict = {}
        self.setup()
        self.start, self.seconds = 0, 0.0
        checkpoint = self.out / "checkpoint.safetensors"
        if checkpoint.exists():
            meta = load_checkpoint(checkpoint, self.modules, self.optims)
            if meta["config"] != {**config, "iterations": meta["config"]["iterations"]}:
                raise ConfigError(f"{checkpoint} was written with another config; use a new --out or delete it")
            self.start, self.seconds = meta["iteration"], meta["seconds"]
        self.writer = self._tensorboard() if self.rank == 0 else None

    def setup(self) -> None:
        raise NotImplementedError

    def wrap(self, module):
        """`module` as this process uses it: DistributedDataParallel under torchrun."""
        return DistributedDataParallel(module) if self.world > 1 else module

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional; log.csv has the same numbers
            return None
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.start + 1)

    def mean_over_ranks(self, losses_t):
        """The logged figures of the global batch, not only rank 0's share."""
        if self.world == 1:
            return losses_t
        values = torch.tensor(list(vars(losses_t).values()), dtype=torch.float64)
        dist.all_reduce(values)
        return type(losses_t)(*(values / self.world).tolist())

    def run(self) -> dict:
        c = self.config
        log = self.out / "log.csv"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_log(log, self.start, self.LOG_COLUMNS)
        began = time.perf_counter() - self.seconds
        last = _last_logged(log) if self.rank == 0 else {}  # what a finished run, rerun, writes into its card again
        for t in range(self.start, c["iterations"]):
            if self.cancel is not None and self.cancel():
                if self.rank == 0 and t > self.start:  # keep what was trained: the same command resumes it
                    meta = {"iteration": t, "seconds": last["seconds"], "config": c}
                    save_checkpoint(self.out / "checkpoint.safetensors", self.modules, self.optims, meta)
                raise Cancelled(f"training cancelled at iteration {t} of {c['iterations']}; {self.out} resumes it, no model was written")
            losses_t = self.mean_over_ranks(self.step(t))
            it = t + 1
            row = {"iteration": it, "seconds": round(time.perf_counter() - began, 3), **self.log_extra(t), **vars(losses_t)}
            validated = self.rank == 0 and c["validate_every"] and (it % c["validate_every"] == 0 or it == c["iterations"])
            if validated:
                row.update(self.validate())
            if self.rank == 0:
                _append_log(log, row, self.LOG_COLUMNS)
                if self.writer is not None:
                    for k, v in row.items():
                        if k != "iteration" and isinstance(v, float) and math.isfinite(v):
                            self.writer.add_scalar(k, v, it)
                if self.progress is not None and (it % c["log_every"] == 0 or it == c["iterations"] or validated):
                    self.progress(row, c["iterations"])
            if self.rank == 0 and (it % c["checkpoint_every"] == 0 or it == c["iterations"]):
                meta = {"iteration": it, "seconds": row["seconds"], "config": c}
                save_checkpoint(self.out / "checkpoint.safetensors", self.modules, self.optims, meta)
            last = row
        if self.rank == 0:
            self.save_model(last)
        if self.writer is not None:  # its last events are flushed only on close
            self.writer.close()
        if self.world > 1:
            dist.barrier()
        if self.owns_group:  # shut down together: a process leaving a live gloo group can abort its peer (SIGABRT)
            dist.destroy_process_group()
        return last

    def log_extra(self, t: int) -> dict:
        """Schedule values logged with iteration `t` (none by default)."""
        return {}

    def training_card(self, last: dict) -> dict:
        """The card's `training` entry: data, split, config, command, final figures."""
        return {
            "data": self.data_description(),
            "patients": self.data.groups,
            "train_pairs": self.data.train_ids,
            "config": self.config,
            "command": " ".join(["priorreg", *sys.argv[1:]]) if sys.argv else None,
            "processes": self.world,
            "iterations": last.get("iteration"),
            "seconds": last.get("seconds"),
            "final_log": {k: v for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)},  # JSON has no NaN
        }

    def data_description(self) -> str:
        d = self.config["data"]
        if d["task"] == "folder":
            return f"the user's pairs in {d['root']}"
        return f"{d['task']} (shared data; see ../shared/data/README.md)"

    def save_model(self, last: dict) -> None:
        tensors = {f"{name}.{k}": v for name, m in self.modules.items() for k, v in m.state_dict().items()}
        card = {**self.card, "training": self.training_card(last)}
        save_model(self.out / f"{self.config['name']}.safetensors", tensors, card)


class Trainer(TrainingRun):
    """The adversarial method's trainer (seed 000): registration network and discriminator."""

    LOG_COLUMNS: ClassVar[list[str]] = [
        "iteration", "seconds", "gamma", "label", "regularizer", "generator", "discriminator",
        "d_simulated", "d_predicted", "val_tre_median_mm", "val_dice",
    ]  # fmt: skip

    def setup(self) -> None:
        config = self.config
        self.data = TrainingSet(config, self.frame)
        adversarial = config["regularizer"] == "adversarial"
        self.simulated = load_simulations(config["simulations"], self.frame) if adversarial else None
        self.field_norm = (
            {"mean": self.simulated.mean((0, 2, 3, 4)).tolist(), "std": float(self.simulated.std())} if adversarial else None
        )
        n = config["network"]
        self.card = adv.model_card(self.frame, n["n0"], n["depth"], adversarial, config["data"]["init"], self.field_norm)
        self.net, self.disc = adv.build_networks(self.card)
        self.net.to(self.device)
        self.opt_g = torch.optim.Adam(self.net.parameters(), lr=config["lr"])
        self.modules, self.optims = {"generator": self.net}, {"generator": self.opt_g}
        if self.disc is not None:
            self.disc.to(self.device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config["lr"])
            self.modules["discriminator"], self.optims["discriminator"] = self.disc, self.opt_d
        self.net_p = self.wrap(self.net)
        self.disc_p = self.wrap(self.disc) if self.disc is not None else None

    def log_extra(self, t: int) -> dict:
        return {"gamma": gamma_at(self.config, t)}

    def _batch(self, draw: dict) -> dict:
        """This rank's slice of the drawn global batch, augmented, on the device."""
        b = self.config["batch_size"] // self.world
        part = slice(self.rank * b, (self.rank + 1) * b)
        idx = draw["pairs"][part].tolist()
        ch = draw["channels"][part].tolist()
        dev = self.device
        pts = self.points
        fa, ma = draw["fixed_affine"][part].to(dev), draw["moving_affine"][part].to(dev)
        fixed_pts = adv.points_through(fa, pts)
        fixed = sample(self.data.fixed[idx].to(dev), self.fgrid, fixed_pts)
        moving_src = self.data.moving[idx].to(dev)
        f_lab = torch.stack([self.data.fixed_labels[i][c : c + 1] for i, c in zip(idx, ch)]).to(dev)
        m_lab = torch.stack([self.data.moving_labels[i][c : c + 1] for i, c in zip(idx, ch)]).to(dev)
        batch = {
            "input": torch.cat([fixed, sample(moving_src, self.mgrid, adv.points_through(ma, pts))], dim=1),
            "fixed_labels": sample(f_lab, self.fgrid, fixed_pts),
            "moving_labels": m_lab,
            "moving_affine": ma,
        }
        if self.simulated is not None:
            sims = self.simulated[draw["simulations"][part]].to(dev)
            batch["simulated"] = adv.normalise_field(sims, self.field_norm)
        return batch

    def step(self, t: int) -> adv.StepLosses:
        """One iteration: the discriminator once, then the registration network once."""
        c = self.config
        draw = draw_batch(c, t, len(self.data), [x.shape[0] for x in self.data.fixed_labels], 0 if self.simulated is None else len(self.simulated))
        batch = self._batch(draw)
        local, affine = self.net_p(batch["input"])
        u = adv.full_field(local, affine, self.fgrid)
        pts = self.points
        warped = sample(batch["moving_labels"], self.mgrid, adv.points_through(batch["moving_affine"], pts + u.movedim(1, -1)))
        label = losses.multiscale_dice(warped, batch["fixed_labels"], self.fgrid)
        record = {}
        if self.disc is not None:
            d_loss, d_sim, d_pred = adv.discriminator_loss(
                self.disc_p, batch["simulated"], adv.normalise_field(local.detach(), self.field_norm), gamma_at(c, t)
            )
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            self.disc.requires_grad_(False)
            penalty = adv.generator_loss(self.disc, adv.normalise_field(local, self.field_norm))
            self.disc.requires_grad_(True)
            record = {"generator": penalty.item(), "discriminator": d_loss.item(), "d_simulated": d_sim, "d_predicted": d_pred}
        else:
            penalty = adv.regularizer_loss(c["regularizer"], local, self.fgrid)
        loss = label + c["weight"] * penalty
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        losses_t = adv.StepLosses(label=label.item(), regularizer=penalty.item(), **record)
        return losses_t

    def validate(self) -> dict:
        """Median landmark TRE and mean gland Dice on the validation patients (images only)."""
        model = adv.LoadedModel.from_networks(self.net, None, self.card, self.device)
        rows = []
        self.net.eval()
        for pair in self.data.val:
            v = pair.load()
            field = adv.register_adversarial(v.fixed, v.moving, loaded=model).field
            rows.append(pair_metrics(field, v.fixed, v.moving, v.fixed_labels, v.moving_labels))
        self.net.train()
        s = summarise(rows)
        return {"val_tre_median_mm": s.get("tre_median_mm", math.nan), "val_dice": s.get("dice_mean", math.nan)}

    def training_card(self, last: dict) -> dict:
        c = self.config
        return {
            **super().training_card(last),
            "labels": c["data"]["labels"],
            "simulations": str(c["simulations"]) if c["simulations"] else None,
            "n_simulations": 0 if self.simulated is None else len(self.simulated),
        }


def _truncate_log(log: Path, iteration: int, columns: list[str]) -> None:
    """Drop log rows after the checkpoint we resume from (they will be recomputed)."""
    if not log.exists():
        return
    with log.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= iteration]
    log.unlink()
    for r in rows:
        _append_log(log, r, columns)


def _last_logged(log: Path) -> dict:
    """The log's last row, its numbers as numbers (empty cells left out); {} without a log."""
    if not log.exists():
        return {}
    with log.open() as f:
        rows = list(csv.DictReader(f))
    return {k: int(v) if k == "iteration" else float(v) for k, v in rows[-1].items() if v != ""} if rows else {}


def _append_log(log: Path, row: dict, columns: list[str]) -> None:
    new = not log.exists()
    with log.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in columns})


def train(config: dict, out, progress=None, cancel=None) -> dict:
    """Train (or resume) to `config['iterations']`; returns the last log row.

    `cancel()` is asked before every iteration: when it returns True, the iterations done are
    kept as the checkpoint in `out` (the same call resumes them) and `Cancelled` is raised.
    """
    if config["method"] == "airnet":
        from .train_airnet import AirnetTrainer as trainer
    elif config["method"] == "symmetric":
        from .train_symmetric import SymmetricTrainer as trainer
    elif config["method"] == "deformgan":
        from .train_deformgan import DeformGANTrainer as trainer
    elif config["method"] == "glands":
        from .train_glands import GlandsTrainer as trainer
    elif config["method"] == "segreg":
        from .train_segreg import SegmenterTrainer as trainer
        from .train_segreg import train_members

        if config["members"] > 1:
            return train_members(config, out, progress, cancel)
    else:
        trainer = Trainer
    return trainer(config, out, progress, cancel).run()

