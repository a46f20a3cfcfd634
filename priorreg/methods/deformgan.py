"""Deform-GAN (seed 002): multimodal registration by a transformation network trained with a translating GAN.

Section 2.1: T maps the pair (R, F) (here fixed, moving) to a warp phi; F(phi) is the warped
moving image; G translates it into the fixed image's modality, F'(phi) = G(F(phi)); D tells the
real fixed image from G's output. The three are trained by turns (`train_deformgan`); only T is
needed to register (`register_deformgan`).

Losses (section 2.2, weights of section 3.3), as `transform_loss`, `generator_loss` and
`discriminator_loss` compute them. The paper writes its similarities with a minus sign
("negative LCC", "negative local gradient distance"); `losses.lncc` is already the negative
correlation and `losses.local_gradient` is the distance (polarity-blind, `1 - cos^2` of the
normalised local gradients, where eq. 3's `|n_R - n_F|` would reward flipped T1/T2 edges; see
its docstring), so here every term is added:

- Eq. 4-6, T: `L_T = lncc(R, F'(phi)) + beta * LG(R, F(phi)) + alpha * |grad u|^2`,
  alpha = 1 (smoothness, eq. 4), beta = 2 (local gradient, eq. 5), LCC weight 1, windows of
  7 voxels of the model frame (28 mm in the 4 mm frame of `train_deformgan.DEFAULTS`).
  LCC compares R with G's *translation* (a mono-modal comparison), LG compares R with the
  warped moving image itself (it works across modalities). `|grad u|^2` is
  `regularizers.gradient_l2` in mm per mm (dimensionless, as the paper's voxel version).
  `similarity="lncc"` (config `loss.similarity`) puts `lncc(R, F(phi))` in LG's place.
- Eq. 8, G: `L_G = GAN + mu * LG(F'(phi), F(phi)) + lambda * L1(F'(phi), R)`, mu = 5 (the
  gradient constraint to the source), lambda = 100 (L1 to the reference); GAN is the
  non-saturating `-log D(F(phi), F'(phi))`.
- D: `(-log D(F(phi), R) - log(1 - D(F(phi), F'(phi)))) / 2`, pix2pix's conditional GAN.
- `gan=False` (`loss.gan: false` in training) is the paper's VoxelMorph-LG baseline: T alone,
  `L_T = beta * LG(R, F(phi)) + alpha * |grad u|^2` (the same LG-to-smoothness balance).

Geometry: the pair is seen in a model frame (`adversarial.ModelFrame`: isotropic voxels,
fixed-size grid along the fixed image's direction, centred on each image's field of view by
default), so one network serves the 1 mm stroke scan and 6.5 mm tumour slices alike. The
moving image is also framed with a margin so that warping samples real intensities past the
frame's edge. T's output times `output_scale_mm` is the displacement in model mm; the result
is mapped to LPS mm on the fixed grid (`adversarial.to_fixed_grid`). Intensities: robust
[0, 1] per image (`common.normalise_intensity`), anti-aliased onto the frame
(`known_deformations.on_grid`).

Initialisation (the card's `preprocessing.init`): `centres` frames each image around its own
field-of-view centre, and T must find the whole deformation. `affine` first aligns the pair by
`baselines.mutual_information_affine` (`p -> A p + t`), frames the moving image through it, and T
predicts what the affine leaves, `r`; the registration is `x -> A (x + r(x)) + t` (no resampling
of one field by another). A T trained this way (`data.init: affine`, with the small residual
deformations of its config's `augment`) learns a local problem instead of a global one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses, regularizers
from ..known_deformations import on_grid
from ..models import load_model, restore
from ..nets.deformgan import PatchDiscriminator, generator_net, transform_net
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, affine_to_field, field_volume, sample
from ..volume import Volume
from .adversarial import ModelFrame, frame_centres, to_fixed_grid
from .baselines import mutual_information_affine
from .common import normalise_intensity, pick_device, similarity_loss

# Section 3.3: alpha (eq. 4, smoothness), beta (eq. 5, local gradient), mu and lambda (eq. 8).
WEIGHTS = {"alpha": 1.0, "beta": 2.0, "mu": 5.0, "lambda": 100.0}
WINDOW = 7  # section 3.3: LCC and local gradient windows, 7x7x7 voxels
# T's direct similarity between the fixed and the warped moving image (`transform_loss`): the paper's, or LNCC.
DIRECT_SIMILARITIES = ("local_gradient", "lncc")


def framed(image: Volume, frame: ModelFrame, centre, direction, moving: bool = False, affine=None) -> torch.Tensor:
    """`[1, 1, K, J, I]`: robust [0, 1] intensities on the frame (with its margin when `moving`).

    `affine` (3x4, frame point -> image point, LPS mm) samples the image through it.
    """
    grid = frame.physical(centre, direction, moving)
    field = None if affine is None else field_volume(affine_to_field(torch.as_tensor(affine, dtype=torch.float64), grid), grid)
    return torch.as_tensor(on_grid(image.with_array(normalise_intensity(image.array)), grid, field).array)[None, None]


def displacement(transform: nn.Module, fixed: torch.Tensor, moving: torch.Tensor, scale_mm: float) -> torch.Tensor:
    """T's field `[B, 3, K, J, I]` in model mm (x, y, z) on the fixed frame."""
    return transform(torch.cat([fixed, moving], dim=1)) * scale_mm


def warp_in_frame(moving_big: torch.Tensor, u: torch.Tensor, frame: ModelFrame) -> torch.Tensor:
    """F(phi): the moving image (framed with the margin) sampled at `x + u(x)` on the fixed frame."""
    grid, mgrid = frame.canonical(), frame.canonical(moving=True)
    return sample(moving_big, mgrid, grid.points(device=u.device)[None] + u.movedim(1, -1))


# ------------------------------------------------------------------------------------- the losses
def transform_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    synthesized: torch.Tensor | None,
    u: torch.Tensor,
    grid: Grid,
    weights: dict = WEIGHTS,
    window: int = WINDOW,
    similarity: str = "local_gradient",
) -> tuple[torch.Tensor, dict]:
    """Eq. 4-6 (T's loss); `synthesized` None (no G) is VoxelMorph-LG's loss.

    `similarity` is the direct term between the fixed and the warped image, weighted by beta:
    the paper's `local_gradient`, or `lncc` (squared local correlation, also blind to which
    modality is bright): `DIRECT_SIMILARITIES`, computed by `common.similarity_loss`.
    """
    if similarity not in DIRECT_SIMILARITIES:
        raise ValueError(f"similarity must be one of {DIRECT_SIMILARITIES}, got {similarity!r}")
    direct = similarity_loss(similarity, fixed, warped, grid, window)
    smooth = regularizers.gradient_l2(u, grid)
    total = weights["beta"] * direct + weights["alpha"] * smooth
    parts = {"similarity": direct.item(), "smoothness": smooth.item()}
    if synthesized is not None:
        cc = losses.lncc(fixed, synthesized, window)
        total = total + cc
        parts["lncc"] = cc.item()
    return total, parts


def generator_loss(
    disc: nn.Module,
    warped: torch.Tensor,
    synthesized: torch.Tensor,
    fixed: torch.Tensor,
    grid: Grid,
    weights: dict = WEIGHTS,
    window: int = WINDOW,
) -> tuple[torch.Tensor, dict]:
    """Eq. 8 (G's loss): fool D, stay close to the reference in L1, keep the source's edges."""
    gan = F.softplus(-disc(warped, synthesized)).mean()
    lg = losses.local_gradient(synthesized, warped, grid, window)
    l1 = losses.mae(synthesized, fixed)
    total = gan + weights["mu"] * lg + weights["lambda"] * l1
    return total, {"g_gan": gan.item(), "g_local_gradient": lg.item(), "g_l1": l1.item()}


def discriminator_loss(disc: nn.Module, warped: torch.Tensor, synthesized: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """D's loss: the fixed image is real, G's output (detached) fake, both conditioned on F(phi)."""
    real, fake = disc(warped, fixed), disc(warped, synthesized.detach())
    total = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    return total, {"d_loss": total.item(), "d_real": torch.sigmoid(real).mean().item(), "d_fake": torch.sigmoid(fake).mean().item()}


# ------------------------------------------------------------------------------------- the model
def model_card(frame: ModelFrame, network: dict, gan: bool, init: str = "centres") -> dict:
    """The card fields inference needs; training adds data, split, command and metrics."""
    return {
        "method": "deformgan",
        "architecture": {
            "transform": {"name": "UNet3D", "channels": list(network["transform"])},
            "generator": {"name": "UNet3D", "channels": list(network["generator"])} if gan else None,
            "discriminator": {"name": "PatchDiscriminator", "channels": list(network["discriminator"])} if gan else None,
            "output_scale_mm": float(network["output_scale_mm"]),
        },
        "gan": gan,
        "frame": {**asdict(frame), "shape": list(frame.shape)},
        "preprocessing": {"intensity": "1st to 99th percentile to [0, 1] per image, anti-aliased onto the frame", "init": init},
    }


def build_networks(card: dict) -> dict[str, nn.Module]:
    """`transform` always; `generator` and `discriminator` when the card was trained with the GAN."""
    a = card["architecture"]
    nets = {"transform": transform_net(tuple(a["transform"]["channels"]))}
    if card["gan"]:
        nets["generator"] = generator_net(tuple(a["generator"]["channels"]))
        nets["discriminator"] = PatchDiscriminator(tuple(a["discriminator"]["channels"]))
    return nets


class LoadedDeformGAN:
    """A trained transformation network T with its card, on a device (G and D are not needed)."""

    def __init__(self, transform: nn.Module, card: dict, device, path=None):
        self.transform, self.card, self.device, self.path = transform, card, torch.device(device), path
        f = card["frame"]
        self.frame = ModelFrame(tuple(f["shape"]), f["spacing"], f["margin"])
        self.scale_mm = float(card["architecture"]["output_scale_mm"])

    @classmethod
    def load(cls, model="deformgan_brain", device: str = "auto") -> LoadedDeformGAN:
        """From a shipped model name or a `.safetensors` path (its `.json` card beside it)."""
        tensors, card, path = load_model(model, method="deformgan")
        dev = pick_device(device)
        return cls(restore(transform_net(tuple(card["architecture"]["transform"]["channels"])), tensors, "transform", dev), card, dev, path)


def register_deformgan(
    fixed: Volume,
    moving: Volume,
    model="deformgan_brain",
    device: str = "auto",
    init: str | None = None,
    progress=None,
    cancel=None,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    similarity: str | None = None,
    loaded: LoadedDeformGAN | None = None,
) -> RegistrationResult:
    """Register with one forward pass of T in the model frame; the field is in LPS mm on the fixed grid.

    With `finetune_steps`, a *copy* of T is first optimised on this pair (test-time instance
    optimisation): Adam on its weights, minimising T's own training loss without G, `beta x
    similarity(fixed, warped) + alpha x |grad u|^2` with the weights and window of the card's
    training config. `similarity` (one of `DIRECT_SIMILARITIES`) defaults to the card's. No
    labels are needed, unlike the label-driven networks' fine-tuning. The loaded weights, in memory
    and on disk, are never changed.
    """
    if similarity is not None and similarity not in DIRECT_SIMILARITIES:
        raise ValueError(f"Deform-GAN fine-tunes T on one of {', '.join(DIRECT_SIMILARITIES)}, not {similarity!r}")
    net = loaded or LoadedDeformGAN.load(model, device)
    init = init or net.card["preprocessing"]["init"]
    monitor = Monitor((2 if init == "affine" else 1) + finetune_steps, progress, cancel)
    fg, mg = Grid.of(fixed), Grid.of(moving)
    affine = None
    if init == "affine":
        affine = mutual_information_affine(fixed, moving)
        monitor.tick("affine", float("nan"))
        cf = cm = fg.center
    else:
        cf, cm = frame_centres(fg, mg, init)
    f = framed(fixed, net.frame, cf, fg.direction).to(net.device)
    m = framed(moving, net.frame, cm, fg.direction, affine=affine).to(net.device)
    transform = net.transform
    if finetune_steps:
        m_big = framed(moving, net.frame, cm, fg.direction, moving=True, affine=affine).to(net.device)
        transform = finetune(net, f, m, m_big, finetune_steps, finetune_lr, similarity, monitor)
    with torch.no_grad():
        u = displacement(transform, f, m, net.scale_mm)
    field = to_fixed_grid(u, fg, net.frame.physical(cf, fg.direction), np.asarray(cf), np.asarray(cm))
    if affine is not None:  # x -> A (x + r(x)) + t
        x = fg.physical_points()
        moved = (x + np.moveaxis(field.array.astype(np.float64), 0, -1)) @ affine[:, :3].T + affine[:, 3] - x
        field = field.with_array(np.moveaxis(moved, -1, 0).astype(field.array.dtype))
    monitor.tick("inference", float("nan"))
    name = "deformgan+finetune" if finetune_steps else "deformgan"
    return RegistrationResult.from_field(field, moving, name, monitor.elapsed, history=monitor.history)


def finetune(
    net: LoadedDeformGAN, fixed, moving, moving_big, steps: int, lr: float, similarity: str | None, monitor: Monitor
) -> nn.Module:
    """A copy of `net.transform` after `steps` Adam steps on one framed pair (see `register_deformgan`).

    `moving` is T's input on the frame, `moving_big` the same image with the frame's margin, which
    the warp samples.
    """
    config = net.card.get("training", {}).get("config", {})
    trained = config.get("loss", {})
    similarity = similarity or trained.get("similarity", "local_gradient")
    weights, window = {**WEIGHTS, **trained.get("weights", {})}, trained.get("window", WINDOW)
    grid = net.frame.canonical()
    tuned = copy.deepcopy(net.transform).train()
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(steps):
        u = displacement(tuned, fixed, moving, net.scale_mm)
        loss = transform_loss(fixed, warp_in_frame(moving_big, u, net.frame), None, u, grid, weights, window, similarity)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        monitor.tick("fine-tune", loss.item())
    return tuned.eval()
