"""Classical instance optimisation of one pair: affine, then a diffeomorphic SVF, coarse to fine.

PriorReg's baseline, and its main job until a trained model ships: it needs no
training data. Fixed and moving keep their own grids throughout (the moving
image is sampled through the transform at every step, never pre-resampled), so
MR to ultrasound with unrelated headers works in physical millimetres.
The transform is `phi = A o exp(v)`: the SVF acts first in fixed space, then
the affine `A` (as in seed 000's composition of local and global parts).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import losses, regularizers
from ..filters import gaussian_smooth_mm
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, affine_to_field, compose, field_volume, integrate_svf, resample, sample, warp
from ..volume import Volume

SIMILARITIES = ("lncc", "mse", "local_gradient")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use 'cpu' or 'auto'")
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


def _label_channels(labels: Volume) -> np.ndarray:
    """One-hot channels of an integer label map (background dropped), or thresholded 4D channels."""
    a = labels.array
    if a.ndim == 4:
        return (a > 0.5).astype(np.float32)
    values = [v for v in np.unique(a) if v != 0]
    return np.stack([(a == v) for v in values]).astype(np.float32)


def _similarity(name: str, fixed: torch.Tensor, warped: torch.Tensor, grid: Grid) -> torch.Tensor:
    if name == "lncc":
        return losses.lncc(fixed, warped)
    if name == "mse":
        return losses.mse(fixed, warped)
    if name == "local_gradient":
        return losses.local_gradient(fixed, warped, grid)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


def register_iterative(
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    similarity: str = "lncc",
    init: str = "geometry",
    affine_steps: int = 100,
    levels: tuple = (4, 2, 1),
    steps: tuple = (120, 80, 40),
    smooth_weight: float = 0.5,
    label_weight: float = 1.0,
    label_sigmas_mm: tuple = losses.DICE_SIGMAS_MM,
    image_weight: float = 1.0,
    lr_mm: float = 0.25,
    device: str = "auto",
    seed: int = 0,
    progress=None,
    cancel=None,
) -> RegistrationResult:
    """Register `moving` to `fixed`; labels (both or neither) add seed 000's multiscale Dice term.

    Labels are segmentations the user wants aligned (e.g. the gland), integer maps
    or 4D channels; never pass evaluation landmarks here. `image_weight` 0 gives a
    purely label-driven registration (the MR-US "oracle" of the project guide).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if len(levels) != len(steps):
        raise ValueError("levels and steps must have the same length")
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("give both fixed and moving labels, or neither")
    torch.manual_seed(seed)
    dev = pick_device(device)
    fgrid, mgrid = Grid.of(fixed), Grid.of(moving)
    f_img = torch.as_tensor(normalise_intensity(fixed.array), device=dev)[None, None]
    m_img = torch.as_tensor(normalise_intensity(moving.array), device=dev)[None, None]
    use_labels = fixed_labels is not None and label_weight > 0
    if use_labels:
        f_lab = torch.as_tensor(_label_channels(fixed_labels), device=dev)[None]
        m_lab = torch.as_tensor(_label_channels(moving_labels), device=dev)[None]
        if f_lab.shape[1] != m_lab.shape[1]:
            raise ValueError(f"fixed and moving labels differ in count ({f_lab.shape[1]} vs {m_lab.shape[1]})")
    monitor = Monitor(affine_steps + sum(steps), progress, cancel)
    center = torch.as_tensor(fgrid.center, dtype=torch.float32, device=dev)

    def level_images(grid: Grid, factor: float):
        sigma = 0.5 * factor * float(np.min(fgrid.spacing)) if factor > 1 else 0.0
        pts = grid.points(device=dev)[None]
        f = sample(gaussian_smooth_mm(f_img, fgrid, sigma), fgrid, pts)
        m = gaussian_smooth_mm(m_img, mgrid, sigma)
        fl = sample(f_lab, fgrid, pts) if use_labels else None
        return f, m, fl

    def loss_of(u, grid, f, m, fl):
        warped = warp(m, u, grid, mgrid)
        loss = image_weight * _similarity(similarity, f, warped, grid)
        if use_labels:
            loss = loss + label_weight * losses.multiscale_dice(warp(m_lab, u, grid, mgrid), fl, grid, label_sigmas_mm)
        return loss

    # Affine stage, at the coarsest level: A = I + d, t = t0 + dt.
    coarse = fgrid.scaled(levels[0])
    f, m, fl = level_images(coarse, levels[0])
    t0 = torch.as_tensor(initial_translation(fgrid, mgrid, init), dtype=torch.float32, device=dev)
    d = torch.zeros(3, 3, device=dev, requires_grad=True)
    t = torch.zeros(3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([{"params": [d], "lr": 0.005}, {"params": [t], "lr": lr_mm * 4}])

    def affine_field(grid: Grid) -> torch.Tensor:
        matrix = torch.cat([torch.eye(3, device=dev) + d, (t0 + t)[:, None]], dim=1)
        return affine_to_field(matrix, grid, center=center)

    for _ in range(affine_steps):
        opt.zero_grad()
        loss = loss_of(affine_field(coarse), coarse, f, m, fl)
        loss.backward()
        opt.step()
        monitor.tick("affine", loss.item())
    d.requires_grad_(False)
    t.requires_grad_(False)

    # Deformable stage: SVF v (mm) on each level's grid, upsampled between levels.
    v = None
    prev = None
    for factor, n in zip(levels, steps):
        grid = fgrid.scaled(factor)
        f, m, fl = level_images(grid, factor)
        a_field = affine_field(grid)
        pts = grid.points(device=dev)[None]
        init_v = torch.zeros(1, 3, *grid.shape, device=dev) if v is None else sample(v, prev, pts, padding="border")
        v = init_v.detach().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=lr_mm)
        for _ in range(n):
            opt.zero_grad()
            u = compose(integrate_svf(v, grid), a_field, grid)
            loss = loss_of(u, grid, f, m, fl) + smooth_weight * regularizers.gradient_l2(v, grid)
            loss.backward()
            opt.step()
            monitor.tick(f"deformable 1/{factor}", loss.item())
        v, prev = v.detach(), grid

    with torch.no_grad():
        if not prev.matches(fgrid):
            v = sample(v, prev, fgrid.points(device=dev)[None], padding="border")
        u = compose(integrate_svf(v, fgrid), affine_field(fgrid), fgrid)
    field = field_volume(u, fgrid)
    warped = resample(moving, fgrid, field)
    warped_labels = resample(moving_labels, fgrid, field) if moving_labels is not None else None
    return RegistrationResult(field, warped, "iterative", monitor.elapsed, warped_labels, monitor.history)
