"""Classical instance optimisation of one pair: affine, then a diffeomorphic SVF, coarse to fine.

PriorReg's baseline, and its main job until a trained model ships: it needs no
training data. Fixed and moving keep their own grids throughout (the moving
image is sampled through the transform at every step, never pre-resampled), so
MR to ultrasound with unrelated headers works in physical millimetres.
The transform is `phi = A o exp(v)`: the SVF acts first in fixed space, then
the affine `A` (as in seed 000's composition of local and global parts).
"""

from __future__ import annotations

import torch

from .. import losses, regularizers
from ..registration import Monitor, RegistrationResult
from ..spatial import Grid, affine_to_field, compose, field_volume, integrate_svf, sample
from ..volume import Volume
from .common import PairData, check_schedule, initial_translation, pick_device


def register_iterative(
    fixed: Volume,
    moving: Volume,
    fixed_labels: Volume | None = None,
    moving_labels: Volume | None = None,
    similarity: str = "lncc",
    init: str = "geometry",
    affine_steps: int = 100,
    affine_level: float = 2,
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
    check_schedule(levels, steps, smooth_weight=smooth_weight, label_weight=label_weight, image_weight=image_weight)
    if image_weight == 0 and (fixed_labels is None or moving_labels is None):
        raise ValueError("image_weight 0 leaves nothing to align: give both images' labels, or an image weight above 0")
    torch.manual_seed(seed)
    dev = pick_device(device)
    pair = PairData(
        fixed, moving, fixed_labels, moving_labels, similarity, dev, image_weight, label_weight, label_sigmas_mm
    )
    fgrid, mgrid = pair.fgrid, pair.mgrid
    monitor = Monitor(affine_steps + sum(steps), progress, cancel)
    center = torch.as_tensor(fgrid.center, dtype=torch.float32, device=dev)

    # Affine stage: A = I + d, t = t0 + dt, at `affine_level` (LNCC's 7-voxel window needs
    # enough voxels: at 1/4 a 26-slice hippocampus crop lets the affine drift off the anatomy).
    coarse = fgrid.scaled(affine_level)
    images = pair.level(coarse, affine_level)
    t0 = torch.as_tensor(initial_translation(fgrid, mgrid, init), dtype=torch.float32, device=dev)
    d = torch.zeros(3, 3, device=dev, requires_grad=True)
    t = torch.zeros(3, device=dev, requires_grad=True)
    opt = torch.optim.Adam([{"params": [d], "lr": 0.005}, {"params": [t], "lr": lr_mm * 4}])

    def affine_field(grid: Grid) -> torch.Tensor:
        matrix = torch.cat([torch.eye(3, device=dev) + d, (t0 + t)[:, None]], dim=1)
        return affine_to_field(matrix, grid, center=center)

    for _ in range(affine_steps):
        opt.zero_grad()
        loss = pair.loss(affine_field(coarse), coarse, images)
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
        images = pair.level(grid, factor)
        a_field = affine_field(grid)
        pts = grid.points(device=dev)[None]
        init_v = torch.zeros(1, 3, *grid.shape, device=dev) if v is None else sample(v, prev, pts, padding="border")
        v = init_v.detach().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=lr_mm)
        for _ in range(n):
            opt.zero_grad()
            u = compose(integrate_svf(v, grid), a_field, grid)
            loss = pair.loss(u, grid, images) + smooth_weight * regularizers.gradient_l2(v, grid)
            loss.backward()
            opt.step()
            monitor.tick(f"deformable 1/{factor}", loss.item())
        v, prev = v.detach(), grid

    with torch.no_grad():
        if not prev.matches(fgrid):
            v = sample(v, prev, fgrid.points(device=dev)[None], padding="border")
        u = compose(integrate_svf(v, fgrid), affine_field(fgrid), fgrid)
    return RegistrationResult.from_field(
        field_volume(u, fgrid), moving, "iterative", monitor.elapsed, moving_labels, monitor.history
    )
