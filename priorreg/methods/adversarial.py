"""Adversarial deformation regularization (seed 000, Hu et al. 2018): losses, training step, inference.

The network sees the pair in a *model frame*: a fixed-size grid (`ModelFrame`, e.g.
24x32x24 voxels of 3 mm) centred on the fixed image's field of view, axes along the fixed
image's direction. The moving image is sampled on a larger grid (`margin` voxels more on
each side) centred where the initialisation puts the fixed centre (`init="centres"`: the
moving field-of-view centre; MR and TRUS headers here describe unrelated frames).
In model coordinates (mm, origin at the grid centre, identity direction) every pair has
the same two grids, so pairs batch and augmentation is one affine per image.

The registration net predicts a local field and a 12-parameter affine; as in the paper's
section 2.2 the moving labels are warped by the local field, then by the affine
(`spatial.compose(global, local)`). Only the local field meets the discriminator,
normalised with the simulated fields' mean and standard deviation (stored in the card).

Losses (section 2.3): discriminator `L_dis = -1/2 E log D(v) - 1/2 E log(1 - D(u)) + gamma/2 Omega`
with Roth et al.'s distribution smoothing `Omega = E_v[(1-D)^2 |grad psi|^2] + E_u[D^2 |grad psi|^2]`
(psi the logit), and the non-saturating generator loss `L_gen = -1/2 E log D(u)`.
`regularizer` picks the paper's comparison: "adversarial", "bending", "l2" or "none".
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import losses, regularizers
from ..models import load_model, prefixed
from ..nets.localnet import Discriminator, RegistrationNet
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, affine_to_field, compose, field_volume, resample, sample
from ..volume import Volume
from .common import initial_translation, label_channels, pick_device

REGULARIZERS = ("adversarial", "bending", "l2", "none")


@dataclass(frozen=True)
class ModelFrame:
    """The network's input grid: `shape` (K, J, I) voxels of `spacing` mm, and the moving margin."""

    shape: tuple = (24, 32, 24)
    spacing: float = 3.0
    margin: int = 8

    def canonical(self, moving: bool = False) -> Grid:
        """The grid in model coordinates: centred on 0 mm, identity direction."""
        shape = tuple(int(s) + (2 * self.margin if moving else 0) for s in self.shape)
        extent = (np.array(shape[::-1], dtype=np.float64) - 1) * self.spacing
        return Grid(shape, np.full(3, float(self.spacing)), -extent / 2, np.eye(3))

    def physical(self, centre, direction, moving: bool = False) -> Grid:
        """The same voxels in LPS: model point `p` is physical point `direction @ p + centre`."""
        g = self.canonical(moving)
        direction = np.asarray(direction, dtype=np.float64)
        return Grid(g.shape, g.spacing, direction @ g.origin + np.asarray(centre, dtype=np.float64), direction)


def standardise(volume: Volume) -> Volume:
    """Zero mean, unit variance over the image's own voxels (the paper's normalisation).

    Done before resampling, so the zero padding outside the field of view is the mean.
    """
    a = volume.array.astype(np.float32)
    return volume.with_array((a - a.mean()) / max(float(a.std()), 1e-6))


def frame_centres(fixed: Grid, moving: Grid, init: str) -> tuple[np.ndarray, np.ndarray]:
    """Physical centres of the fixed and moving model grids."""
    return fixed.center, fixed.center + initial_translation(fixed, moving, init)


def frame_pair(fixed, moving, frame: ModelFrame, init: str, fixed_labels=None, moving_labels=None) -> dict:
    """One pair as model-frame arrays: images standardised, labels as float channels in [0, 1]."""
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, init)
    fgrid, mgrid = frame.physical(cf, fg.direction), frame.physical(cm, fg.direction, moving=True)
    out = {
        "fixed": resample(standardise(fixed), fgrid).array[None],
        "moving": resample(standardise(moving), mgrid).array[None],
    }
    if fixed_labels is not None:
        # label channels (data.binary_channels' threshold, one-hot integer maps) resampled as floats
        out["fixed_labels"] = resample(fixed_labels.with_array(label_channels(fixed_labels)), fgrid, mode="linear").array
        out["moving_labels"] = resample(moving_labels.with_array(label_channels(moving_labels)), mgrid, mode="linear").array
    return out


# ------------------------------------------------------------------------------- the network's maps
def points_through(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """`[B, 3, 4]` affines applied to points `[B, ..., 3]` (or shared `[..., 3]`)."""
    if points.dim() == 4:
        points = points.unsqueeze(0).expand(affine.shape[0], *points.shape)
    flat = points.reshape(points.shape[0], -1, 3)
    moved = flat @ affine[:, :, :3].transpose(1, 2) + affine[:, None, :, 3]
    return moved.reshape(points.shape)


def full_field(local: torch.Tensor, affine: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Model-frame displacement: the local field first, then the affine, on the moving labels."""
    eye = torch.eye(3, 4, dtype=affine.dtype, device=affine.device)
    global_field = affine_to_field(eye + affine, grid)
    return compose(global_field, local, grid)


@dataclass
class StepLosses:
    """What one training iteration measured (plain floats, for logs)."""

    label: float
    regularizer: float
    generator: float = float("nan")
    discriminator: float = float("nan")
    d_simulated: float = float("nan")
    d_predicted: float = float("nan")


def discriminator_loss(disc, simulated: torch.Tensor, predicted: torch.Tensor, gamma: float):
    """Eq. 2: JS-GAN discriminator loss plus gamma/2 times Roth et al.'s smoothing term."""
    x = torch.cat([simulated, predicted]).requires_grad_(gamma > 0)
    logits = disc(x)
    n = simulated.shape[0]
    real, fake = logits[:n], logits[n:]
    loss = 0.5 * F.softplus(-real).mean() + 0.5 * F.softplus(fake).mean()
    if gamma > 0:
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        norm2 = grad.flatten(1).square().sum(1)
        omega = ((1 - torch.sigmoid(real)) ** 2 * norm2[:n]).mean() + (torch.sigmoid(fake) ** 2 * norm2[n:]).mean()
        loss = loss + 0.5 * gamma * omega
    return loss, torch.sigmoid(real).mean().item(), torch.sigmoid(fake).mean().item()


def normalise_field(field: torch.Tensor, field_norm: dict) -> torch.Tensor:
    """Local fields as the discriminator sees them: the simulated fields' mean and std (the card's)."""
    mean = torch.as_tensor(field_norm["mean"], dtype=field.dtype, device=field.device)[None, :, None, None, None]
    return (field - mean) / field_norm["std"]


def generator_loss(disc, predicted: torch.Tensor) -> torch.Tensor:
    """Eq. 3: the non-saturating generator loss, -1/2 E log D(u)."""
    return 0.5 * F.softplus(-disc(predicted)).mean()


def regularizer_loss(name: str, local: torch.Tensor, grid: Grid) -> torch.Tensor:
    if name == "bending":
        return regularizers.bending_energy(local, grid)
    if name == "l2":
        return regularizers.gradient_l2(local, grid)
    return local.new_zeros(())


# ------------------------------------------------------------------------------------- the model
def build_networks(card: dict) -> tuple[RegistrationNet, Discriminator | None]:
    arch = card["architecture"]
    shape = tuple(card["frame"]["shape"])
    net = RegistrationNet(shape, arch["n0"], arch["depth"])
    disc = Discriminator(shape, arch["n0"], arch["depth"]) if arch.get("discriminator") else None
    return net, disc


def model_card(frame: ModelFrame, n0: int, depth: int, discriminator: bool, init: str, field_norm: dict) -> dict:
    """The card fields inference needs; training adds data, command and metrics."""
    return {
        "method": "adversarial",
        "architecture": {"name": "RegistrationNet", "n0": n0, "depth": depth, "discriminator": discriminator},
        "frame": {**asdict(frame), "shape": list(frame.shape)},
        "preprocessing": {"intensity": "zero mean, unit variance per image", "init": init},
        "field_norm": field_norm,
    }


class LoadedModel:
    """A registration network (and its discriminator, when trained with one) with its card, on a device."""

    def __init__(self, net: RegistrationNet, disc: Discriminator | None, card: dict, device, path=None):
        self.net, self.disc, self.card, self.device, self.path = net, disc, card, torch.device(device), path
        f = card["frame"]
        self.frame = ModelFrame(tuple(f["shape"]), f["spacing"], f["margin"])

    @classmethod
    def load(cls, model="adversarial_mrus", device: str = "auto") -> "LoadedModel":
        """From a shipped model name or a `.safetensors` path (its `.json` card beside it)."""
        tensors, card, path = load_model(model, method="adversarial")
        net, disc = build_networks(card)
        net.load_state_dict(prefixed(tensors, "generator"))
        if disc is not None:
            disc.load_state_dict(prefixed(tensors, "discriminator"))
        return cls.from_networks(net, disc, card, pick_device(device), path)

    @classmethod
    def from_networks(cls, net, disc, card: dict, device, path=None) -> "LoadedModel":
        """Networks already in memory (the trainer's validation uses the weights being trained)."""
        net.to(device).eval()
        if disc is not None:
            disc.to(device).eval()
        return cls(net, disc, card, device, path)


def to_fixed_grid(u_model: torch.Tensor, fixed: Grid, fgrid: Grid, cf, cm) -> Volume:
    """Model-frame field -> LPS mm displacement on the fixed image's own grid."""
    direction = torch.as_tensor(fgrid.direction, dtype=u_model.dtype)
    shift = torch.as_tensor(cm - cf, dtype=u_model.dtype)
    u_phys = torch.einsum("ab,nbkji->nakji", direction, u_model.cpu()) + shift[None, :, None, None, None]
    on_fixed = sample(u_phys.double(), fgrid, fixed.points(torch.float64)[None], padding="border")
    return field_volume(on_fixed, fixed)


def register_adversarial(
    fixed: Volume,
    moving: Volume,
    model="adversarial_mrus",
    device: str = "auto",
    init: str | None = None,
    progress=None,
    cancel=None,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    similarity: str | None = None,
    loaded: LoadedModel | None = None,
) -> RegistrationResult:
    """Register with a trained network: one forward pass in the model frame.

    With `finetune_steps`, a *copy* of the network is first optimised on this pair
    (test-time instance optimisation, as uniGradICON and ConvexAdam do): Adam on its
    weights, minimising the multiscale Dice of the given labels (both or neither)
    and/or an image `similarity` ("lncc", "mse", "mae", "local_gradient"), plus the
    model's adversarial prior (its discriminator's generator loss, weight lambda_adv)
    when it has one, so that the tuned field stays plausible. The loaded weights,
    in memory and on disk, are never changed.

    `init` overrides the card's initialisation. `loaded` reuses a `LoadedModel`
    (evaluation loops load once). Without fine-tuning the network sees images only.
    """
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed and moving labels, or neither")
    if finetune_steps and fixed_labels is None and similarity is None:
        raise ValueError("fine-tuning needs labels (fixed and moving) or an image similarity")
    monitor = Monitor(finetune_steps + 1, progress, cancel)
    model = loaded or LoadedModel.load(model, device)
    init = init or model.card["preprocessing"]["init"]
    fg, mg = Grid.of(fixed), Grid.of(moving)
    cf, cm = frame_centres(fg, mg, init)
    tuning = finetune_steps > 0 and fixed_labels is not None
    arrays = frame_pair(fixed, moving, model.frame, init, fixed_labels if tuning else None, moving_labels if tuning else None)
    pair = {k: torch.as_tensor(v, device=model.device)[None] for k, v in arrays.items()}
    fcan, mcan = model.frame.canonical(), model.frame.canonical(moving=True)
    net = model.net
    if finetune_steps:
        net = finetune(model, pair, finetune_steps, finetune_lr, similarity, monitor)
    with torch.no_grad():
        m_in = sample(pair["moving"], mcan, fcan.points(device=model.device)[None])
        local, affine = net(torch.cat([pair["fixed"], m_in], dim=1))
        u = full_field(local, affine, fcan)
    field = to_fixed_grid(u, fg, model.frame.physical(cf, fg.direction), cf, cm)
    monitor.tick("inference", float("nan"))
    name = "adversarial+finetune" if finetune_steps else "adversarial"
    return RegistrationResult.from_field(field, moving, name, monitor.elapsed, moving_labels, monitor.history)


def finetune(model: LoadedModel, pair: dict, steps: int, lr: float, similarity: str | None, monitor: Monitor):
    """A copy of `model.net` after `steps` Adam steps on one model-frame pair (see `register_adversarial`)."""
    from .common import similarity_loss

    net = copy.deepcopy(model.net).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    fcan, mcan = model.frame.canonical(), model.frame.canonical(moving=True)
    pts = fcan.points(device=model.device)
    m_in = sample(pair["moving"], mcan, pts[None])
    lambda_adv = model.card.get("training", {}).get("config", {}).get("weight", 0.01)
    for _ in range(steps):
        local, affine = net(torch.cat([pair["fixed"], m_in], dim=1))
        u = full_field(local, affine, fcan)
        moved = pts[None] + u.movedim(1, -1)
        loss = local.new_zeros(())
        if "fixed_labels" in pair:
            loss = loss + losses.multiscale_dice(sample(pair["moving_labels"], mcan, moved), pair["fixed_labels"], fcan)
        if similarity is not None:
            loss = loss + similarity_loss(similarity, pair["fixed"], sample(pair["moving"], mcan, moved), fcan)
        if model.disc is not None:
            loss = loss + lambda_adv * generator_loss(model.disc, normalise_field(local, model.card["field_norm"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        monitor.tick("fine-tune", loss.item())
    return net.eval()
