"""VoxelMorph as a learned peer: the `voxelmorph` PyPI package (PyTorch), trained by us with its own recipe.

Users who would not pick PriorReg would pick VoxelMorph; it cannot be downloaded pre-trained for
these crops, so `python -m bench voxelmorph` trains it on exactly the hippocampus subjects the
symmetric network trains on (`train_symmetric.subject_splits`, same seed), framed the same way
(centred on each crop at 1 mm, 48x64x48 instead of 48x56x40 so that four halvings divide
it; the same intensity normalisation), so the two learned
methods differ only in network, losses and schedule. The recipe is VoxelMorph's semi-supervised
one (`scripts/tf/train_semisupervised_seg.py` defaults: MSE + 0.01 x L2 gradient + 0.01 x Dice
on the labels, Adam 1e-4, batch 1, 7 scaling-and-squaring steps, no augmentation) with the
package's `VxmPairwise` U-Net at the script's widths. The schedule is ours: `iterations` pair
updates, logged with validation Dice, as long a run as the symmetric network's on this machine.

Geometry: VoxelMorph's displacement is in voxels of the frame, channels in array-axis order
(k, j, i); PriorReg's model-frame field is in mm, channels (x, y, z). `model_field` converts,
and `adversarial.to_fixed_grid` puts it on the fixed image's own grid (LPS mm), so the peer is
scored by the same `priorreg.evaluate` code as every method (`bench.peers` calls `register`) (Testing/bench/test_voxelmorph.py
checks the conversion against VoxelMorph's own warp on an oblique grid).
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import torch

from priorreg import Volume
from priorreg.data import hippocampus_pairs
from priorreg.evaluate import pair_metrics, summarise
from priorreg.grid import Grid
from priorreg.methods import symmetric as sym
from priorreg.methods.adversarial import ModelFrame, frame_centres, to_fixed_grid
from priorreg.models import load_model, save_model
from priorreg.train_symmetric import DEFAULTS as SYMMETRIC
from priorreg.train_symmetric import FramedSubjects, subject_splits

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "bench" / "results" / "voxelmorph_hippocampus.safetensors"
# The symmetric frame (48x56x40) padded to multiples of 16 for VoxelMorph's four halvings.
FRAME = ModelFrame((48, 64, 48), SYMMETRIC["frame"]["spacing"], 0)
RECIPE = {
    "nb_features": [16, 32, 32, 32],  # the script's encoder widths (four halvings), decoder mirrored
    "integration_steps": 7,
    "lr": 1e-4,
    "weights": {"mse": 1.0, "grad_l2": 0.01, "dice": 0.01},
}


def build(recipe: dict = RECIPE) -> torch.nn.Module:
    import voxelmorph as vxm

    return vxm.nn.models.VxmPairwise(
        ndim=3, source_channels=1, target_channels=1, nb_features=recipe["nb_features"], integration_steps=recipe["integration_steps"]
    )


def model_field(disp_voxels: torch.Tensor, spacing: float) -> torch.Tensor:
    """VoxelMorph displacement `[B, 3 (k, j, i), ...]` in voxels -> model-frame field `[B, 3 (x, y, z), ...]` in mm."""
    return disp_voxels.flip(1) * spacing


def train(
    root, out: Path | None = None, iterations: int = 3000, seed: int = 0, validate_every: int = 250, log=print, limit: int | None = None
) -> Path:
    """Train on the symmetric network's training subjects (the first `limit` of them, for tests).

    Writes `out` (default `WEIGHTS`, safetensors), its card and `<stem>_log.csv` at every
    validation, so a run stopped early leaves the last validated network with a card saying how
    far it got. Validation: the validation subjects, each fixed once with the next as moving (the
    first `limit` pairs when limited).
    """
    import neurite as ne

    torch.manual_seed(seed)
    splits = subject_splits({**SYMMETRIC["data"], "root": root})
    subjects = FramedSubjects(splits["train"][:limit], root, FRAME)
    val_pairs = hippocampus_pairs(root, subjects=splits["val"])[:limit]  # the symmetric trainer's validation pairs
    out = Path(out or WEIGHTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = build()
    opt = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
    mse, grad, dice = ne.nn.modules.MSE(), ne.nn.modules.SpatialGradient("l2"), ne.nn.modules.Dice()
    w = RECIPE["weights"]
    rng = random.Random(seed)
    rows, start = [], time.time()
    for t in range(1, iterations + 1):
        a, b = rng.sample(range(len(subjects)), 2)  # fixed a, moving b: different subjects
        f, m = subjects.images[a : a + 1], subjects.images[b : b + 1]
        disp, warped = net(m, f, return_warped_source=True)
        warped_labels = net.spatial_transformer(subjects.labels[b : b + 1], disp)
        terms = {"mse": mse(f, warped), "grad_l2": grad(disp), "dice": 1 - dice(subjects.labels[a : a + 1], warped_labels).mean()}
        loss = sum(w[k] * v for k, v in terms.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t % 50 and t % validate_every and t != iterations:
            continue
        rows.append({"iteration": t, "seconds": round(time.time() - start, 1), "loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
        if t % validate_every == 0 or t == iterations:
            net.eval()
            rows[-1].update({f"val_{k}": v for k, v in validate(net, val_pairs).items()})
            net.train()
            log(json.dumps(rows[-1]))
            _save(out, net, rows, {"subjects": subjects.ids, "validation_pairs": len(val_pairs), "iterations": t, "seed": seed})
    return out


def _save(out: Path, net: torch.nn.Module, rows: list[dict], training: dict) -> None:
    with open(out.with_name(out.stem + "_log.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    card = {
        "method": "voxelmorph (bench peer)",
        "package": f"voxelmorph {_version('voxelmorph')}, neurite {_version('neurite')}",
        "recipe": RECIPE,
        "frame": {"shape": list(FRAME.shape), "spacing": FRAME.spacing},
        "training": {**training, "seconds": rows[-1]["seconds"]},
        "final_log": rows[-1],
        "command": f"python -m bench voxelmorph --iterations {training['iterations']} --seed {training['seed']}",
    }
    save_model(out, dict(net.state_dict()), card)


def validate(net, pairs) -> dict:
    """Dice, HD95 and SDlogJ on validation pairs, through the same code path as evaluation."""
    reports = []
    for pair in pairs:
        v = pair.load()
        reports.append(pair_metrics(register(v.fixed, v.moving, net), v.fixed, v.moving, v.fixed_labels, v.moving_labels))
    s = summarise(reports)
    return {k: s[k] for k in ("dice_mean", "dice30", "hd95_mm", "sdlogj", "folding_pct")}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


_LOADED: dict = {}


def load(path: Path | None = None) -> torch.nn.Module:
    """The trained peer (default `WEIGHTS`, cached per path); a clear error naming the command that makes it."""
    path = Path(path or WEIGHTS)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found: train it with `python -m bench voxelmorph --data-root PATH`")
    if path not in _LOADED:
        tensors, card, _ = load_model(path)
        net = build(card["recipe"])
        net.load_state_dict(tensors)
        _LOADED[path] = net.eval()
    return _LOADED[path]


def register(fixed: Volume, moving: Volume, net: torch.nn.Module | None = None) -> Volume:
    """One forward pass: each image framed around its own field of view (as the symmetric method), field on the fixed grid."""
    net = net or load()
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, "centres")
    f, m = (torch.as_tensor(sym.frame_image(v, FRAME, c, fg.direction)["image"])[None] for v, c in ((fixed, cf), (moving, cm)))
    with torch.no_grad():
        disp = net(m, f)
    return to_fixed_grid(model_field(disp, FRAME.spacing), fg, FRAME.physical(cf, fg.direction), cf, cm)
