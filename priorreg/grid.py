"""`Grid`: the geometry of a 3D voxel grid, without its voxels.

Plain numpy (torch is imported only by `points`), so the Slicer bridge can use
it in a Slicer where torch is not installed yet. `Grid.index_to_physical` is the
one place where index <-> LPS mm is defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .volume import Volume


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D voxel grid: shape `(K, J, I)` and LPS spacing, origin, direction."""

    shape: tuple
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, volume: "Volume | Grid") -> "Grid":
        if isinstance(volume, Grid):
            return volume
        return cls(tuple(volume.shape), volume.spacing.copy(), volume.origin.copy(), volume.direction.copy())

    def matches(self, other: "Volume | Grid", atol: float = 1e-4) -> bool:
        """Same shape and the same geometry within `atol` (mm, or direction cosines)."""
        o = Grid.of(other)
        return (
            tuple(self.shape) == tuple(o.shape)
            and np.allclose(self.spacing, o.spacing, atol=atol)
            and np.allclose(self.origin, o.origin, atol=atol)
            and np.allclose(self.direction, o.direction, atol=atol)
        )

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4: homogeneous index `(i, j, k, 1)` -> LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def scaled(self, factor: float) -> "Grid":
        """A coarser (factor > 1) grid over the same field of view: first and last voxel centres kept."""
        n = np.array(self.shape, dtype=np.float64)
        m = np.maximum(np.ceil((n - 1) / factor) + 1, np.minimum(n, 2)).astype(int)
        ratio = np.where(m > 1, (n - 1) / np.maximum(m - 1, 1), 1.0)
        return Grid(tuple(int(x) for x in m), np.asarray(self.spacing) * ratio[::-1], self.origin, self.direction)

    @property
    def center(self) -> np.ndarray:
        """Physical centre of the field of view (the middle voxel position), mm."""
        mid = (np.array(self.shape[::-1], dtype=np.float64) - 1) / 2
        return self.index_to_physical[:3] @ np.append(mid, 1.0)

    def physical_points(self) -> np.ndarray:
        """Physical coordinates of every voxel centre, `[K, J, I, 3]` in mm (float64)."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in self.shape), indexing="ij")
        m = self.index_to_physical
        return np.stack([i, j, k], axis=-1) @ m[:3, :3].T + m[:3, 3]

    def points(self, dtype=None, device=None):
        """`physical_points` as a torch tensor (float32 by default) for the warping code."""
        import torch

        return torch.as_tensor(self.physical_points(), device=device).to(torch.float32 if dtype is None else dtype)
