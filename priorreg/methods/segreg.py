"""Registration through segmentation: label the structures in both images, then register the label maps.

`glands` does this for MR to ultrasound with one segmenter per modality and one structure.
This method is its same-modality, several-structure form: one trained segmenter (`UNet3D`,
softmax over the background and each structure) labels both images, and the label-only
iterative registration (`register_iterative` with `image_weight=0`: an affine, then a
diffeomorphic SVF at 1/4, 1/2 and full resolution, on the multiscale Dice of every structure)
aligns the two label maps. Images in, images only.

Why: on the hippocampus the symmetric network (seed 004) predicts a field in one pass but
leaves the structures' outlines about 0.8 Dice apart on validation subjects; a segmenter
trained on the same subjects outlines each image's structures at about 0.87 Dice of the
expert's, and aligning those outlines directly (as the learned anchors' best entries do by
test-time optimisation) gains what the one-pass field leaves (README, seed 004 section).
The iterative optimisation costs seconds where the network costs a tenth of one.

The segmenter sees each image on a frame of fixed shape and spacing centred on the image's own
field of view along its own axes, intensities as the symmetric network's (`symmetric.normalise`).
The most probable class of each voxel, resampled onto the image's grid, gives one binary channel
per structure. A model may hold several such networks trained alike from different seeds (the
card's `architecture.members`): their class probabilities are averaged before the most probable
class is taken, as nnU-Net ensembles its folds (on the hippocampus validation subjects, averaging
over shifted frames of one network did not help; networks from other seeds err elsewhere).
A user who has a segmentation of either image gives it as `fixed_labels` or `moving_labels` (an
integer map with the card's label values, or one channel per structure in the card's order, as
Slicer's segments arrive): it replaces that prediction.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..models import load_model, restore
from ..nets.unet import UNet3D
from ..registration import RegistrationResult
from ..spatial import resample
from ..volume import Volume
from .adversarial import ModelFrame
from .common import pick_device
from .glands import frame_grid, register_outlines
from .symmetric import normalise

# The smoothness weight of the outlines' registration (`register_iterative`'s default is 0.5). Outlines of
# several small structures want a freer field than images do: on the 22 hippocampus validation pairs the
# registered outlines reach Dice 0.819 with 0.5, 0.824 with 0.2 and 0.826 with 0.1 against the experts' labels
# (SDlogJ 0.063, 0.079, 0.089; never folding). 0.1 is the lightest of these whose SDlogJ stays within the paper's 0.09 (`priorreg evaluate
# --task hippocampus --method segreg --split val --smooth-weight W`).
SMOOTH_WEIGHT = 0.1
# An image term (LNCC) beside the outlines' Dice barely helps: on the same 22 validation pairs, at smoothness 0.1,
# image weights 0.03, 0.1 and 0.3 give Dice 0.828, 0.831 and 0.831 against 0.826 without, but SDlogJ 0.11, 0.19 and
# 0.32 against 0.089 (0.3 folds); 0.1 with smoothness 0.3 gives 0.826 at SDlogJ 0.11 (`--image-weight W`). The outlines
# stay alone by default: 0.005 of Dice does not pay for twice the SDlogJ (beyond the paper's 0.09).


def model_card(frame: ModelFrame, channels, labels: dict[int, str], modality: str, members: int = 1) -> dict:
    """The card fields inference needs; training adds data, command and metrics. `labels`: value -> structure name.

    `members` > 1: the file holds that many networks of this architecture (tensors `member<k>.*`), averaged.
    """
    return {
        "method": "segreg",
        "architecture": {"name": "UNet3D", "channels": list(channels), "output": "softmax over background and each label", "members": members},
        "frame": {"shape": list(frame.shape), "spacing": frame.spacing},
        "labels": {str(k): v for k, v in labels.items()},
        "modality": modality,
        "preprocessing": {"intensity": "N(0,1) per image, clipped to [-5, 5], min-max to [0, 1]", "frame": "centred on the image's own field of view"},
    }


def build_network(card: dict) -> UNet3D:
    return UNet3D(1, 1 + len(card["labels"]), card["architecture"]["channels"], init_std=None)


def member_prefixes(card: dict) -> list[str]:
    """Where each network's tensors sit in the model file: `network` alone, or `member0`, `member1`, ..."""
    n = card["architecture"].get("members", 1)
    return ["network"] if n == 1 else [f"member{k}" for k in range(n)]


class LoadedSegmenter:
    """The trained segmenter (one network or an ensemble of them) with its card, on a device."""

    def __init__(self, nets: list[UNet3D], card: dict, device, path=None):
        self.nets, self.card, self.device, self.path = nets, card, torch.device(device), path
        f = card["frame"]
        self.frame = ModelFrame(tuple(f["shape"]), f["spacing"], 0)
        self.labels = [int(k) for k in card["labels"]]

    @classmethod
    def load(cls, model="segreg_hippocampus", device: str = "auto") -> LoadedSegmenter:
        """From a shipped model name or a `.safetensors` path (its `.json` card beside it)."""
        tensors, card, path = load_model(model, method="segreg")
        dev = pick_device(device)
        return cls([restore(build_network(card), tensors, prefix, dev) for prefix in member_prefixes(card)], card, dev, path)

    def segment(self, image: Volume) -> Volume:
        """One binary channel per structure `[L, K, J, I]` (float32) on `image`'s grid: each voxel's most probable class."""
        if image.array.ndim != 3:
            raise ValueError(f"{image.source or 'image'}: a 3D image is needed to segment it, got shape {image.array.shape}")
        if float(image.array.min()) == float(image.array.max()):
            raise ValueError(f"{image.source or 'image'}: constant image (no contrast): there is nothing to segment")
        grid = frame_grid(image, self.frame)
        x = torch.as_tensor(resample(normalise(image), grid).array, device=self.device)
        with torch.no_grad():
            p = torch.stack([net(x[None, None]).softmax(1)[0] for net in self.nets]).mean(0).cpu().numpy()  # background first
        p = resample(Volume(p, grid.spacing, grid.origin, grid.direction), image, mode="linear").array
        best = p.argmax(0)
        return image.with_array(np.stack([best == c for c in range(1, p.shape[0])]).astype(np.float32))

    def channels_of(self, labels: Volume) -> Volume:
        """A user's segmentation as the segmenter's channels: an integer map with the card's label values, or 4D
        channels (a Slicer segmentation's segments) in the card's label order."""
        if labels.array.ndim == 4:
            if labels.array.shape[0] != len(self.labels):
                names = ", ".join(self.card["labels"].values())
                raise ValueError(f"{labels.source or 'labels'}: {labels.array.shape[0]} segments given, the model has {len(self.labels)} ({names})")
            return labels.with_array((labels.array >= 0.5).astype(np.float32))
        if not np.isin(labels.array, self.labels).any():
            raise ValueError(f"{labels.source or 'labels'}: none of the model's labels {self.labels} is in the segmentation")
        return labels.with_array(np.stack([labels.array == v for v in self.labels]).astype(np.float32))


def register_segreg(
    fixed: Volume,
    moving: Volume,
    model="segreg_hippocampus",
    device: str = "auto",
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    init: str = "centres",
    progress=None,
    cancel=None,
    loaded: LoadedSegmenter | None = None,
    smooth_weight: float = SMOOTH_WEIGHT,
    image_weight: float = 0.0,
) -> RegistrationResult:
    """Segment both images (or take the user's label maps), then register the label maps alone.

    A structure the segmenter finds in neither image is left out of the registration; one found
    in only one image is an error (the images do not show the same anatomy, or one lies outside
    the other's field of view), and so is an image in which nothing is found. `image_weight` > 0 adds the
    images' LNCC beside the outlines' Dice (off by default: see the comment under `SMOOTH_WEIGHT`).
    """
    start = time.perf_counter()
    net = loaded or LoadedSegmenter.load(model, device)
    maps = {}
    for role, image, given in (("fixed", fixed, fixed_labels), ("moving", moving, moving_labels)):
        maps[role] = net.channels_of(given) if given is not None else net.segment(image)
        if not maps[role].array.any():
            raise ValueError(f"no structure of the model's ({', '.join(net.card['labels'].values())}) found in the {role} image ({image.source or role})")
    present = {role: maps[role].array.reshape(len(net.labels), -1).any(1) for role in maps}
    lonely = [net.card["labels"][str(v)] for v, f, m in zip(net.labels, present["fixed"], present["moving"]) if f != m]
    if lonely:
        raise ValueError(f"found in only one of the two images: {', '.join(lonely)}: do both show the same anatomy?")
    keep = present["fixed"]
    fl, ml = (maps[r].with_array(maps[r].array[keep]) for r in ("fixed", "moving"))
    result = register_outlines(fixed, moving, fl, ml, moving_labels, init, str(net.device), progress, cancel, image_weight, smooth_weight=smooth_weight)
    result.method, result.seconds = "segreg", time.perf_counter() - start
    return result
