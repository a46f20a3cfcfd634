"""What every per-pair optimisation method shares: device, intensities, labels, per-level images, loss.

`iterative.py` (SVF) and `dip.py` (deep image prior) differ only in how they
parameterise the field; the pair they optimise on is prepared here, once.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import losses
from ..data import binary_channels
from ..filters import gaussian_smooth_mm
from ..spatial import Grid, sample, warp
from ..volume import Volume

# The image similarities of the per-pair optimisers and of test-time fine-tuning (`similarity_loss`). DeepImagePriorReg's
# parameter node repeats them as a literal, which `Testing/packaging/test_panels.py` holds equal to this.
SIMILARITIES = ("lncc", "mse", "mae", "local_gradient", "mi")


def check_schedule(levels, steps, **weights: float) -> None:
    """Refuse, before any work, a schedule or loss weight that would run and mislead.

    A negative weight turns a penalty into a reward: the optimiser then runs the field away
    (a loss falling without bound) and returns a wild result with no error.
    """
    if len(levels) != len(steps):
        raise ValueError("levels and steps must have the same length")
    if any(not factor >= 1 for factor in levels):
        raise ValueError(f"levels are downsampling factors, 1 (full resolution) or more; got {', '.join(map(str, levels))}")
    if any(n < 1 for n in steps):
        raise ValueError(f"each level needs 1 step or more; got {', '.join(map(str, steps))}")
    negative = [f"{name} {w}" for name, w in weights.items() if not w >= 0]
    if negative:
        raise ValueError(f"weights must be 0 or more; got {', '.join(negative)}")


def pick_device(device: str = "auto") -> torch.device:
    """The torch device for "auto" (CUDA when present), "cpu" or "cuda"; a `ValueError` (a user's
    choice this machine cannot honour, one line in the CLI and the panels) for CUDA without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use 'cpu' or 'auto'")
    return torch.device(device)


def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """Robust [0, 1] scaling (1st to 99th percentile), so losses see comparable ranges."""
    a = array.astype(np.float32)
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def initial_translation(fixed: Grid, moving: Grid, init: str) -> np.ndarray:
    """`geometry`: trust the headers (zero); `centres`: move the fixed FOV centre onto the moving one."""
    if init == "geometry":
        return np.zeros(3)
    if init == "centres":
        return moving.center - fixed.center
    raise ValueError(f"init must be 'geometry' or 'centres', got {init!r}")


def label_channels(labels: Volume) -> np.ndarray:
    """One-hot channels of an integer label map (background dropped), or 4D channels at `>= 0.5`."""
    if labels.array.ndim == 4:
        return binary_channels(labels).array.astype(np.float32)
    a = labels.array
    values = [v for v in np.unique(a) if v != 0]
    return np.stack([(a == v) for v in values]).astype(np.float32)


def similarity_loss(name: str, fixed: torch.Tensor, warped: torch.Tensor, grid: Grid, window: int = 7) -> torch.Tensor:
    """One of `SIMILARITIES` (lower is better); `window` (voxels) is that of the local ones, lncc and local_gradient;
    mi is global (mutual information, for pairs of two modalities)."""
    if name == "lncc":
        return losses.lncc(fixed, warped, window)
    if name == "mse":
        return losses.mse(fixed, warped)
    if name == "mae":
        return losses.mae(fixed, warped)
    if name == "local_gradient":
        return losses.local_gradient(fixed, warped, grid, window)
    if name == "mi":
        return losses.mutual_information(fixed, warped)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


class PairData:
    """One pair as tensors on a device, and the loss of a field on any level's grid.

    Labels (both or neither) are segmentations the user wants aligned; they add
    seed 000's multiscale Dice with `label_weight`. Never pass evaluation landmarks.
    """

    def __init__(
        self,
        fixed: Volume,
        moving: Volume,
        fixed_labels: Volume | None,
        moving_labels: Volume | None,
        similarity: str,
        device: torch.device,
        image_weight: float = 1.0,
        label_weight: float = 1.0,
        label_sigmas_mm=losses.DICE_SIGMAS_MM,
    ):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if (fixed_labels is None) != (moving_labels is None):
            raise ValueError("give both fixed and moving labels, or neither")
        self.similarity, self.device = similarity, device
        self.image_weight, self.label_weight, self.label_sigmas_mm = image_weight, label_weight, label_sigmas_mm
        self.fgrid, self.mgrid = Grid.of(fixed), Grid.of(moving)
        self.f_img = torch.as_tensor(normalise_intensity(fixed.array), device=device)[None, None]
        self.m_img = torch.as_tensor(normalise_intensity(moving.array), device=device)[None, None]
        self.use_labels = fixed_labels is not None and label_weight > 0
        if self.use_labels:
            self.f_lab = torch.as_tensor(label_channels(fixed_labels), device=device)[None]
            self.m_lab = torch.as_tensor(label_channels(moving_labels), device=device)[None]
            if self.f_lab.shape[1] != self.m_lab.shape[1]:
                raise ValueError(
                    f"fixed and moving labels differ in count ({self.f_lab.shape[1]} vs {self.m_lab.shape[1]})"
                )

    def level(self, grid: Grid, factor: float):
        """Fixed image (and labels) on `grid`, moving image smoothed for that resolution (own grid)."""
        sigma = 0.5 * factor * float(np.min(self.fgrid.spacing)) if factor > 1 else 0.0
        pts = grid.points(device=self.device)[None]
        f = sample(gaussian_smooth_mm(self.f_img, self.fgrid, sigma), self.fgrid, pts)
        m = gaussian_smooth_mm(self.m_img, self.mgrid, sigma)
        fl = sample(self.f_lab, self.fgrid, pts) if self.use_labels else None
        return f, m, fl

    def loss(self, u: torch.Tensor, grid: Grid, level) -> torch.Tensor:
        """Image similarity (+ label Dice) of the field `u` (mm, on `grid`) with `level`'s images."""
        f, m, fl = level
        loss = torch.zeros((), device=u.device)
        if self.image_weight > 0:  # the label-only registrations (glands, segreg) never compute an image term
            loss = loss + self.image_weight * similarity_loss(self.similarity, f, warp(m, u, grid, self.mgrid), grid)
        if self.use_labels:
            warped_labels = warp(self.m_lab, u, grid, self.mgrid)
            loss = loss + self.label_weight * losses.multiscale_dice(warped_labels, fl, grid, self.label_sigmas_mm)
        return loss
