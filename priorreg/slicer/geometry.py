"""LPS <-> RAS: the one place where PriorReg's geometry meets Slicer's.

PriorReg keeps geometry in LPS (ITK, DICOM); Slicer's world is RAS. The two
differ by negating the first two physical components, a flip that is its own
inverse, so one function serves both directions. Index <-> LPS is `Grid`'s;
like it, these load in a Slicer where torch is not installed yet.
"""

from __future__ import annotations

import numpy as np

from ..grid import Grid

_FLIP = np.array([-1.0, -1.0, 1.0])


def flip_lps_ras(points: np.ndarray) -> np.ndarray:
    """Points or vectors `[..., 3]` from LPS to RAS, or from RAS to LPS."""
    return np.asarray(points, dtype=np.float64) * _FLIP


def ijk_to_ras(grid: Grid) -> np.ndarray:
    """4x4 IJKToRAS matrix of a Slicer volume node with this (LPS) grid."""
    m = grid.index_to_physical
    m[:3] *= _FLIP[:, None]
    return m


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS `(spacing, origin, direction)` from a node's 4x4 IJKToRAS matrix."""
    lps = np.asarray(matrix, dtype=np.float64)[:3] * _FLIP[:, None]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return spacing, lps[:, 3].copy(), lps[:, :3] / spacing[None, :]
