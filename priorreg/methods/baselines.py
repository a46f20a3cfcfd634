"""The starting points every method must beat: the headers' geometry, centred fields of view, a plain affine.

MR and TRUS headers in the shared data describe unrelated frames, so `identity`
(trust the physical geometry as stored) and `centres` (translate the fixed
field-of-view centre onto the moving one) are the two honest "no registration" figures.
`mutual_information_affine` is what a user gets from "just align them" in the classical tools:
the benchmark's `affine` peer, and the pre-alignment of networks trained on what an affine leaves.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
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


def mutual_information_affine(fixed: Volume, moving: Volume) -> np.ndarray:
    """3x4 `[A | t]` mapping a fixed LPS point `p` to its moving point `A p + t` (mm), by Mattes MI.

    Initialised by aligning the intensity centres of mass (ANTs' default start; MR and TRUS headers
    are in unrelated frames), then 12 parameters by regular-step gradient descent over 3 levels (shrink
    4, 2, 1) on a fixed 10 % random sample of voxels (seeded: runs repeat to micrometres). Nothing constrains the
    determinant, as in the tools users have. SimpleITK's thread count is the caller's (its global default).
    """
    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    start = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 1)  # a fixed seed: SimpleITK's 0 means the wall clock
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(start, inPlace=False)
    transform = reg.Execute(f, m)
    # ITK's physical space is LPS, as PriorReg's: read the matrix off four points (the map is affine).
    points = Grid.of(fixed).center + np.vstack([np.zeros(3), 100.0 * np.eye(3)])
    mapped = np.array([transform.TransformPoint(tuple(float(x) for x in p)) for p in points])
    solution, *_ = np.linalg.lstsq(np.c_[points, np.ones(4)], mapped, rcond=None)
    return solution.T


def register_affine(fixed: Volume, moving: Volume, **_) -> RegistrationResult:
    """`mutual_information_affine` as a field on the fixed grid."""
    start = time.perf_counter()
    grid = Grid.of(fixed)
    field = field_volume(affine_to_field(torch.as_tensor(mutual_information_affine(fixed, moving)), grid), grid)
    return RegistrationResult.from_field(field, moving, "affine", time.perf_counter() - start)
