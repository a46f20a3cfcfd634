"""Test geometry: anisotropic, oblique, non-zero-origin grids (where registration tools break)."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from priorreg import Volume
from priorreg.spatial import Grid


def oblique(angles_deg, spacing, origin, shape, array=None, seed=0) -> Volume:
    direction = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    if array is None:
        array = np.random.default_rng(seed).random(shape).astype(np.float32)
    return Volume(array, spacing, origin, direction)


def moving_volume() -> Volume:
    """A smooth textured moving image (so linear interpolation differences are meaningful)."""
    rng = np.random.default_rng(3)
    coarse = torch.as_tensor(rng.random((1, 1, 6, 7, 8)), dtype=torch.float32)
    array = torch.nn.functional.interpolate(coarse, size=(20, 24, 28), mode="trilinear", align_corners=True)
    return oblique([10, -20, 30], [1.2, 0.8, 2.5], [-30, 20, 5], (20, 24, 28), array[0, 0].numpy())


def fixed_volume() -> Volume:
    """Another oblique, anisotropic grid, centred on the moving image so that most of it overlaps."""
    vol = oblique([-5, 15, -10], [1.3, 0.9, 1.7], [0, 0, 0], (18, 22, 25))
    half = vol.direction @ (vol.spacing * (np.array(vol.shape[::-1]) - 1) / 2)
    return Volume(vol.array, vol.spacing, Grid.of(moving_volume()).center - half, vol.direction)


def smooth_field(grid: Grid, amplitude_mm: float = 3.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, dtype=torch.float64, generator=gen) * amplitude_mm
    return torch.nn.functional.interpolate(coarse, size=grid.shape, mode="trilinear", align_corners=True)
