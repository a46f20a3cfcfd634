"""Symmetric registration by spatial gradients (seed 004, Estienne et al., Learn2Reg 2020 task 4).

The network (`nets.symnet.SymNet`) predicts, for each axis, the derivative of the sampling
grid along that axis, in (0, 2); the grid is its cumulative sum (`gradients_to_displacement`),
so it is monotonic along every axis and cannot fold there. One network gives both
directions, `D(E(M) - E(F))` (moving -> fixed) and `D(E(F) - E(M))` (fixed -> moving);
training scores both (`pair_loss` on each), which is the paper's symmetric formulation.

Pairs are seen in a model frame (`ModelFrame`, margin 0: both images on the same-size grid),
each image centred on its own field of view (`init: centres`, the default) or the moving one
on the fixed centre (`geometry`), along the fixed image's direction. Intensities follow the
paper: zero mean and unit variance over the image, clipped to [-5, 5], then scaled to [0, 1].
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import torch

from .. import losses
from ..filters import gaussian_smooth_mm
from ..models import load_model, restore
from ..nets.symnet import SymNet
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, resample, sample
from ..volume import Volume
from .adversarial import ModelFrame, frame_centres, to_fixed_grid
from .common import SIMILARITIES, label_channels, pick_device, similarity_loss


def normalise(volume: Volume) -> Volume:
    """The paper's intensities: N(0, 1) over the image, clipped to [-5, 5], min-max to [0, 1]."""
    a = volume.array.astype(np.float32)
    a = np.clip((a - a.mean()) / max(float(a.std()), 1e-6), -5, 5)
    return volume.with_array((a - a.min()) / max(float(a.max() - a.min()), 1e-6))


def frame_image(image: Volume, frame: ModelFrame, centre, direction, labels: Volume | None = None) -> dict:
    """One image (normalised) and its one-hot labels (as floats) on the frame centred at `centre`."""
    grid = frame.physical(centre, direction)
    out = {"image": resample(normalise(image), grid).array[None]}
    if labels is not None:
        out["labels"] = resample(labels.with_array(label_channels(labels)), grid, mode="linear").array
    return out


# ---------------------------------------------------------------------------- gradients -> field
def gradients_to_displacement(grad: torch.Tensor, spacing: float, size) -> torch.Tensor:
    """Spatial gradients `[B, 3, k, j, i]` (x, y, z) -> displacement in mm `[B, 3, *size]`.

    Channel c is the derivative of the grid's c-th coordinate along axis c (x: i, y: j,
    z: k), in units of the gradient's own voxels; the grid is its cumulative sum from the
    first voxel. A gradient `f` times coarser than `size` gives positions in coarse voxels;
    they are scaled by `f` (coarse voxel k sits at fine index `f k + (f - 1) / 2`, which
    trilinear upsampling without corner alignment also assumes) and upsampled.
    """
    factor = size[-1] / grad.shape[-1]
    parts = []
    for c, axis in enumerate((3, 2, 1)):  # axes of the [B, k, j, i] channel
        g = grad[:, c]
        n = g.shape[axis]
        index = torch.arange(n, dtype=g.dtype, device=g.device).view([n if a == axis else 1 for a in range(4)])
        parts.append(torch.cumsum(g, dim=axis) - 1 - index)
    u = torch.stack(parts, 1) * (factor * spacing)
    if tuple(u.shape[2:]) != tuple(size):
        u = torch.nn.functional.interpolate(u, size=tuple(size), mode="trilinear", align_corners=False)
    return u


def pair_loss(
    grad: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_labels: torch.Tensor | None,
    moving_labels: torch.Tensor | None,
    grid: Grid,
    weights: dict,
    similarity: str = "mse",
    dice_sigmas_mm=(0.0,),
) -> tuple[torch.Tensor, dict]:
    """Section 2.1's loss of one direction and one head: alpha sim + beta Dice + gamma smoothness.

    `grid` is the canonical frame (both images on it). Smoothness is the mean distance of
    the spatial gradient from the identity's (1), "keeping it close to zero deformation".
    Dice is the paper's soft Dice with `dice_sigmas_mm=(0,)`; more sigmas average it over
    Gaussian-smoothed labels (seed 000's multiscale Dice), which still pulls where small
    structures do not overlap yet.
    """
    u = gradients_to_displacement(grad, float(grid.spacing[0]), grid.shape)
    points = grid.points(device=u.device)[None] + u.movedim(1, -1)
    warped = sample(moving, grid, points)
    sim = similarity_loss(similarity, fixed, warped, grid)
    smooth = (grad - 1).abs().mean()
    total = weights["similarity"] * sim + weights["smoothness"] * smooth
    parts = {"similarity": sim.item(), "smoothness": smooth.item()}
    if fixed_labels is not None and weights["dice"] > 0:
        dice = losses.multiscale_dice(sample(moving_labels, grid, points), fixed_labels, grid, dice_sigmas_mm)
        total = total + weights["dice"] * dice
        parts["dice"] = dice.item()
    return total, parts


# ------------------------------------------------------------------------------------- the model
def model_card(frame: ModelFrame, channels, output_level: int, heads: int, init: str, smooth_mm: float = 0.0) -> dict:
    """The card fields inference needs; training adds data, command and metrics.

    `postprocessing.smooth_mm`: the Gaussian (mm) `register_symmetric` puts on the predicted
    fields by default, a choice made on validation pairs for each model (0: the raw output).
    """
    return {
        "method": "symmetric",
        "architecture": {"name": "SymNet", "channels": list(channels), "output_level": output_level, "heads": heads},
        "frame": {**asdict(frame), "shape": list(frame.shape)},
        "preprocessing": {"intensity": "N(0,1) per image, clipped to [-5, 5], min-max to [0, 1]", "init": init},
        "postprocessing": {"smooth_mm": smooth_mm},
    }


def build_network(card: dict) -> SymNet:
    a = card["architecture"]
    return SymNet(tuple(a["channels"]), a["output_level"], a["heads"])


class LoadedSymmetric:
    """A trained SymNet with its card, on a device."""

    def __init__(self, net: SymNet, card: dict, device, path=None):
        self.net, self.card, self.device, self.path = net, card, torch.device(device), path
        f = card["frame"]
        self.frame = ModelFrame(tuple(f["shape"]), f["spacing"], f["margin"])

    @classmethod
    def load(cls, model="symmetric_hippocampus", device: str = "auto") -> LoadedSymmetric:
        """From a shipped model name or a `.safetensors` path (its `.json` card beside it)."""
        tensors, card, path = load_model(model, method="symmetric")
        dev = pick_device(device)
        return cls(restore(build_network(card), tensors, "network", dev), card, dev, path)


def register_symmetric(
    fixed: Volume,
    moving: Volume,
    model="symmetric_hippocampus",
    device: str = "auto",
    init: str | None = None,
    progress=None,
    cancel=None,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-3,
    similarity: str | None = "lncc",
    loaded: LoadedSymmetric | None = None,
    smooth_mm: float | None = None,
) -> RegistrationResult:
    """Register with one forward pass; the result also carries the fixed -> moving field.

    `smooth_mm`: a Gaussian of that standard deviation on both predicted fields (default: the
    card's `postprocessing.smooth_mm`, 0 where the card has none). The network's raw field is
    rougher than its Dice needs: on the shipped model's validation pairs 1 mm halves SDlogJ and
    removes nearly all folding at the same Dice (README, seed 004 section).

    `inverse_field` (on the moving grid) comes from the same pass, `D(E(F) - E(M))`: the
    quality report's inverse consistency uses it.

    With `finetune_steps`, a *copy* of the network is first optimised on this pair (test-time
    instance optimisation): Adam on its weights, on the training loss of both directions with
    the image `similarity` ("lncc" by default; `common.SIMILARITIES`; None for labels only), the Dice of the
    labels when both are given, and the card's smoothness weight. The loaded weights never change.
    """
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed and moving labels, or neither")
    if similarity is not None and similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES} or None, got {similarity!r}")
    if finetune_steps and similarity is None and fixed_labels is None:
        raise ValueError("fine-tuning needs an image similarity or labels (fixed and moving)")
    monitor = Monitor(finetune_steps + 1, progress, cancel)
    net = loaded or LoadedSymmetric.load(model, device)
    if smooth_mm is None:
        smooth_mm = net.card.get("postprocessing", {}).get("smooth_mm", 0.0)
    if not smooth_mm >= 0:
        raise ValueError(f"smooth_mm must be 0 or more (mm), got {smooth_mm}")
    init = init or net.card["preprocessing"]["init"]
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, init)
    labels = (fixed_labels, moving_labels) if finetune_steps else (None, None)  # only fine-tuning uses them
    framed = [frame_image(image, net.frame, centre, fg.direction, lab) for image, centre, lab in ((fixed, cf, labels[0]), (moving, cm, labels[1]))]
    f, m = (torch.as_tensor(x["image"], device=net.device)[None] for x in framed)
    fl, ml = (torch.as_tensor(x["labels"], device=net.device)[None] if "labels" in x else None for x in framed)
    can = net.frame.canonical()
    network = finetune(net, f, m, fl, ml, finetune_steps, finetune_lr, similarity, monitor) if finetune_steps else net.net
    with torch.no_grad():
        forward, backward = network(f, m)
        spacing = float(can.spacing[0])
        u, u_inv = (gaussian_smooth_mm(gradients_to_displacement(g[0], spacing, can.shape), can, smooth_mm) for g in (forward, backward))
    field = to_fixed_grid(u, fg, net.frame.physical(cf, fg.direction), cf, cm)
    inverse = to_fixed_grid(u_inv, mg, net.frame.physical(cm, fg.direction), cm, cf)
    monitor.tick("inference", float("nan"))
    name = "symmetric+finetune" if finetune_steps else "symmetric"
    result = RegistrationResult.from_field(field, moving, name, monitor.elapsed, moving_labels, monitor.history)
    result.inverse_field = inverse
    return result


def finetune(net: LoadedSymmetric, f, m, fl, ml, steps: int, lr: float, similarity: str | None, monitor: Monitor) -> SymNet:
    """A copy of `net.net` after `steps` Adam steps on one framed pair (labels `fl`, `ml` or None)."""
    trained = net.card.get("training", {}).get("config", {}).get("loss", {}).get("weights", {})
    weights = {"similarity": 1.0 if similarity else 0.0, "dice": 1.0, "smoothness": trained.get("smoothness", 0.1)}
    can = net.frame.canonical()
    tuned = copy.deepcopy(net.net).train()
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(steps):
        forward, backward = tuned(f, m)
        loss = pair_loss(forward[0], f, m, fl, ml, can, weights, similarity or "mse")[0]
        loss = loss + pair_loss(backward[0], m, f, ml, fl, can, weights, similarity or "mse")[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        monitor.tick("fine-tune", loss.item())
    return tuned.eval()
