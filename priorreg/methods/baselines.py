"""The starting points every method must beat: the headers' geometry, and centred fields of view.

MR and TRUS headers in the shared data describe unrelated frames, so `identity`
(trust the physical geometry as stored) and `centres` (translate the fixed
field-of-view centre onto the moving one) are the two honest "no registration" figures.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..registration import RegistrationResult
from ..spatial import Grid, affine_to_field, field_volume
from ..volume import Volume


def _translation_result(fixed: Volume, moving: Volume, t: np.ndarray, name: str, start: float):
    grid = Grid.of(fixed)
    field = field_volume(affine_to_field(torch.as_tensor(np.c_[np.eye(3), t]), grid), grid)
    return RegistrationResult.from_field(field, moving, name, time.perf_counter() - start)


def register_identity(fixed: Volume, moving: Volume, **_) -> RegistrationResult:
    """Zero displacement: the moving image resampled through the headers' geometry alone."""
    return _translation_result(fixed, moving, np.zeros(3), "identity", time.perf_counter())


def register_centres(fixed: Volume, moving: Volume, **_) -> RegistrationResult:
    """A translation that puts the fixed field-of-view centre on the moving one."""
    start = time.perf_counter()
    return _translation_result(fixed, moving, Grid.of(moving).center - Grid.of(fixed).center, "centres", start)
