"""MR-US registration through the gland: segment it in each image, then register the two segmentations.

The project's MR-US "oracle", a label-only registration of the expert gland outlines
(`iterative.register_iterative` with `image_weight=0`), leaves a median landmark TRE of
about 4 mm on the test patients, while every image-driven method here (the adversarial
network, AIR-net, mutual information in ANTs or elastix) stays near the 10-11 mm of
merely centring the fields of view. Ultrasound and MR share almost no intensity
relationship, but both show the gland. So this method replaces the expert outlines by
those of two small trained segmenters, one per modality (`UNet3D`, sigmoid output), and
runs the same label-only registration on them: images in, images only.

A segmenter may be an ensemble of independently trained U-Nets whose probabilities are averaged
(`members` in the card): with 52 training images, two runs of the same recipe differ by several
Dice points on a given patient, and the registration inherits any bias of one run's outline.
Each segmenter sees its image on a frame of fixed shape and spacing centred on the image's
own field of view along its own axes (so the headers' unrelated frames do not matter), the
intensities standardised (zero mean, unit variance, as the adversarial network's input). The
probability map is resampled onto the image's grid and thresholded at 0.5 by the
registration (`label_channels`). A user who has a gland segmentation (the MR contour from
biopsy planning, say) gives it as `moving_labels` (or `fixed_labels`; channel 0 of 4D labels,
else label 1): it replaces that image's prediction.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..models import load_model, restore
from ..nets.unet import UNet3D
from ..registration import RegistrationResult
from ..spatial import Grid, resample
from ..volume import Volume
from .adversarial import ModelFrame, standardise
from .common import label_channels, pick_device
from .iterative import register_iterative

IMAGE_SIMILARITY = "mi"  # what --image-weight adds: MR and ultrasound intensities share no local linear map (LNCC's model)

ROLES = ("fixed", "moving")  # ultrasound, MR: one segmenter each
# A predicted gland smaller than this is not a prostate: a quarter of the smallest expert gland of the shared
# MR-US set (19 mL; a test checks the margin). It is what a non-prostate image (a test: a hippocampus MR crop)
# or a header that lost its voxel spacings gives.
MIN_GLAND_ML = 5.0


class Segmenter(nn.Module):
    """`members` U-Nets of one modality: each outputs a gland logit; the segmenter, their mean probability."""

    def __init__(self, channels, members: int = 1):
        super().__init__()
        self.members = nn.ModuleList(UNet3D(1, 1, tuple(channels), init_std=None) for _ in range(members))

    def forward(self, x: torch.Tensor, each: bool = False) -> torch.Tensor:
        """`[B, 1, ...]` images -> mean gland probability `[B, 1, ...]`; with `each` (training), member k's
        logits of its own images: `[K, B, 1, ...]` -> `[K, B, 1, ...]` (one forward, so torchrun's DDP sees it)."""
        if each:
            return torch.stack([m(xk) for m, xk in zip(self.members, x)])
        return torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0)


def model_card(frames: dict[str, ModelFrame], networks: dict[str, dict], modalities: dict[str, str]) -> dict:
    """The card fields inference needs (`networks`: each role's `channels` and `members`); training adds data, command and metrics."""
    return {
        "method": "glands",
        "architecture": {
            "name": "UNet3D", "output": "mean gland probability",
            **{r: {"channels": list(n["channels"]), "members": n["members"]} for r, n in networks.items()},
        },  # fmt: skip
        "frames": {r: {"shape": list(f.shape), "spacing": f.spacing} for r, f in frames.items()},
        "modalities": modalities,
        "preprocessing": {"intensity": "zero mean, unit variance per image", "frame": "centred on the image's own field of view"},
    }


def build_networks(card: dict) -> dict[str, Segmenter]:
    a = card["architecture"]
    return {r: Segmenter(a[r]["channels"], a[r]["members"]) for r in ROLES}


def frame_grid(image: Volume, frame: ModelFrame) -> Grid:
    """`frame`'s voxels centred on `image`'s field of view, along its axes."""
    g = Grid.of(image)
    return frame.physical(g.center, g.direction)


class LoadedGlands:
    """The two trained segmenters with their card, on a device."""

    def __init__(self, nets: dict[str, Segmenter], card: dict, device, path=None):
        self.nets, self.card, self.device, self.path = nets, card, torch.device(device), path
        self.frames = {r: ModelFrame(tuple(f["shape"]), f["spacing"], 0) for r, f in card["frames"].items()}

    @classmethod
    def load(cls, model="glands_mrus", device: str = "auto") -> LoadedGlands:
        """From a shipped model name or a `.safetensors` path (its `.json` card beside it)."""
        tensors, card, path = load_model(model, method="glands")
        dev = pick_device(device)
        return cls({role: restore(net, tensors, role, dev) for role, net in build_networks(card).items()}, card, dev, path)

    def segment(self, image: Volume, role: str) -> Volume:
        """Gland probability `[1, K, J, I]` on `image`'s grid; `role` "fixed" (ultrasound) or "moving" (MR)."""
        p = resample(self.frame_probability(image, role), image, mode="linear")
        return p.with_array(np.clip(p.array, 0.0, 1.0))  # float32 interpolation can overshoot 1 by an ulp

    def frame_probability(self, image: Volume, role: str) -> Volume:
        """Gland probability `[1, ...]` on the segmenter's own frame (centred on `image`): `segment`
        without the resampling to the image's grid, for what needs only the gland's place (the quality check)."""
        if image.array.ndim != 3:
            raise ValueError(f"{image.source or 'image'}: a 3D image is needed to segment the gland, got shape {image.array.shape}")
        if float(image.array.min()) == float(image.array.max()):
            raise ValueError(f"{image.source or 'the ' + role + ' image'}: constant image (no contrast): there is no gland to outline")
        grid = frame_grid(image, self.frames[role])
        x = torch.as_tensor(resample(standardise(image), grid).array, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            p = self.nets[role](x[None, None])[0].cpu().numpy()
        return Volume(p, grid.spacing, grid.origin, grid.direction)


def gland_of(labels: Volume) -> Volume:
    """A user's segmentation as one gland channel: channel 0 of 4D labels (the MR-US convention), or label 1."""
    array = labels.array[0] >= 0.5 if labels.array.ndim == 4 else labels.array == 1
    if not array.any():
        raise ValueError(f"{labels.source or 'labels'}: the gland segmentation is empty")
    return labels.with_array(array[None].astype(np.float32))


def gland_ml(gland: Volume) -> float:
    """The volume in mL of a gland channel (a prediction or `gland_of`'s), where it is >= 0.5."""
    return float(label_channels(gland).sum() * np.prod(gland.spacing)) / 1000


def register_glands(
    fixed: Volume,
    moving: Volume,
    model="glands_mrus",
    device: str = "auto",
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    init: str = "centres",
    progress=None,
    cancel=None,
    loaded: LoadedGlands | None = None,
    image_weight: float = 0.0,
) -> RegistrationResult:
    """Segment the gland in both images (or take the user's), then register the segmentations alone.

    The registration is `register_iterative` with its default schedule (affine, then a
    diffeomorphic SVF at 1/4, 1/2 and full resolution) and the gland's multiscale Dice as its
    only term; `image_weight` > 0 adds the images' mutual information (`IMAGE_SIMILARITY`) with that
    weight, for what the outlines miss inside and around the gland (0.3: validation median TRE 5.88 ->
    5.12 mm, test 5.83 -> 5.97 with RMS 7.74 -> 7.38; README, "MR to TRUS through the gland"; so 0 by
    default). An empty predicted gland (an image with no prostate in view) is an error, not a
    silent identity, and so is one smaller than any prostate (`MIN_GLAND_ML`). With both glands
    given nothing is segmented: that is the label-only registration of expert outlines the method
    is measured against.
    """
    start = time.perf_counter()
    given = {"fixed": fixed_labels, "moving": moving_labels}
    net = loaded
    if net is None and None in (fixed_labels, moving_labels):  # both glands given: nothing to segment
        net = LoadedGlands.load(model, device)
    glands = {}
    for role, image in (("fixed", fixed), ("moving", moving)):
        glands[role] = gland_of(given[role]) if given[role] is not None else net.segment(image, role)
        ml = gland_ml(glands[role])
        if ml == 0:
            raise ValueError(f"no gland found in the {role} image ({image.source or role}): is the prostate in its field of view?")
        if given[role] is None and ml < MIN_GLAND_ML:
            raise ValueError(
                f"the gland predicted in the {role} image ({image.source or role}) is {ml:.1f} mL, too small for a prostate "
                f"(under {MIN_GLAND_ML:g} mL): is the prostate in its field of view, and are its voxel spacings right?"
            )
    device = str(net.device) if net is not None else device
    result = register_outlines(
        fixed, moving, glands["fixed"], glands["moving"], moving_labels, init, device, progress, cancel, image_weight,
        similarity=IMAGE_SIMILARITY,
    )
    result.method, result.seconds = "glands", time.perf_counter() - start
    return result


def register_outlines(
    fixed, moving, fixed_outlines, moving_outlines, moving_labels, init, device, progress, cancel, image_weight=0.0, **options
) -> RegistrationResult:
    """How every segment-then-register method (glands, segreg) ends: `register_iterative` on the outlines
    (alone by default: `image_weight` 0).

    `options` go to `register_iterative` (segreg: a lighter smoothness). The result's warped labels
    are the user's own moving labels (as every method returns them), or None: never the outline
    channels registered here.
    """
    result = register_iterative(
        fixed, moving, fixed_outlines, moving_outlines, image_weight=image_weight, init=init, device=device, progress=progress,
        cancel=cancel, **options,
    )  # fmt: skip
    result.warped_labels = resample(moving_labels, result.field, result.field) if moving_labels is not None else None
    return result
