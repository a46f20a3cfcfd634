"""LPS <-> RAS: the one place where PriorReg's geometry meets Slicer's.

PriorReg keeps geometry in LPS (ITK, DICOM); Slicer's world is RAS. The two
differ by negating the first two physical components, a flip that is its own
inverse, so one function serves both directions. Plain numpy, so that these
helpers load in a Slicer where torch is not installed yet.
"""

from __future__ import annotations

import numpy as np

_FLIP = np.array([-1.0, -1.0, 1.0])


def flip_lps_ras(points: np.ndarray) -> np.ndarray:
    """Points or vectors `[..., 3]` from LPS to RAS, or from RAS to LPS."""
    return np.asarray(points, dtype=np.float64) * _FLIP


def index_to_lps(spacing, origin, direction) -> np.ndarray:
    """4x4: homogeneous index `(i, j, k, 1)` -> LPS mm."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[None, :]
    m[:3, 3] = origin
    return m


def ijk_to_ras(spacing, origin, direction) -> np.ndarray:
    """4x4 IJKToRAS matrix of a Slicer volume node with this LPS geometry."""
    m = index_to_lps(spacing, origin, direction)
    m[:3] *= _FLIP[:, None]
    return m


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS `(spacing, origin, direction)` from a node's 4x4 IJKToRAS matrix."""
    lps = np.asarray(matrix, dtype=np.float64)[:3] * _FLIP[:, None]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return spacing, lps[:, 3].copy(), lps[:, :3] / spacing[None, :]


def voxel_points(shape, index_to_physical: np.ndarray) -> np.ndarray:
    """Physical position of every voxel centre, `[K, J, I, 3]`, through a 4x4 index matrix."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    return index @ index_to_physical[:3, :3].T + index_to_physical[:3, 3]
