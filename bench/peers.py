"""Peers as `registrar(fixed, moving) -> field` callables, fields in PriorReg's convention.

Each peer's output transform is turned into a displacement field on the fixed
grid (LPS mm, fixed point -> moving point), which is exactly what ITK-based
tools compute when asked for the deformation field of their forward (resampling)
transform, so every tool is scored by the same `priorreg.evaluate` code.
A peer whose package is missing is reported as missing, never silently dropped.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from priorreg import Volume

THREADS = int(os.environ.get("PRIORREG_BENCH_THREADS", "2"))


def _affine(fixed: Volume, moving: Volume) -> Volume:
    """A plain affine, what a user gets from "just align them": SimpleITK, Mattes mutual information.

    Initialised by aligning the intensity centres of mass (ANTs' default start; MR and TRUS headers
    are in unrelated frames), then 12 parameters by regular-step gradient descent over 3 levels (shrink
    4, 2, 1) on a fixed 10 % random sample of voxels (seeded, so runs repeat). Nothing constrains the
    determinant, as in the tools users have. Always available: SimpleITK is a core dependency.
    """
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    start = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(start, inPlace=False)
    transform = reg.Execute(f, m)
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(), f.GetSpacing(), f.GetDirection()
    )
    return Volume.from_sitk(field)


def _ants_syn(fixed: Volume, moving: Volume) -> Volume:
    """ANTsPy affine + SyN, both driven by Mattes mutual information (multimodal pairs such as brain_t1t2).

    MI is `ants.registration`'s default for both stages; it is named here so that an upstream
    change of default cannot silently turn the multimodal benchmark into a same-modality one.
    """
    import ants

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        f_path, m_path = Path(tmp, "f.nii.gz"), Path(tmp, "m.nii.gz")
        Volume(fixed.array.astype(np.float32), fixed.spacing, fixed.origin, fixed.direction).write(f_path)
        Volume(moving.array.astype(np.float32), moving.spacing, moving.origin, moving.direction).write(m_path)
        f, m = ants.image_read(str(f_path)), ants.image_read(str(m_path))
        reg = ants.registration(
            f, m, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes", outprefix=str(Path(tmp, "reg_"))
        )
        composed = ants.apply_transforms(f, m, transformlist=reg["fwdtransforms"], compose=str(Path(tmp, "u_")))
        return _field_from_file(composed)


def _elastix_bspline(fixed: Volume, moving: Volume) -> Volume:
    """elastix affine + B-spline with Mattes mutual information (works across modalities)."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        f_path, m_path = Path(tmp, "f.nii.gz"), Path(tmp, "m.nii.gz")
        Volume(fixed.array.astype(np.float32), fixed.spacing, fixed.origin, fixed.direction).write(f_path)
        Volume(moving.array.astype(np.float32), moving.spacing, moving.origin, moving.direction).write(m_path)
        f = itk.imread(str(f_path), itk.F)
        m = itk.imread(str(m_path), itk.F)
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("affine"))
        params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
        _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
        field = itk.transformix_deformation_field(m, result, output_directory=tmp)  # not the cwd
        field.SetOrigin(f.GetOrigin())
        field.SetSpacing(f.GetSpacing())
        field.SetDirection(f.GetDirection())
        path = Path(tmp, "u.nii.gz")
        itk.imwrite(field, str(path))
        return _field_from_file(path)


def _field_from_file(path) -> Volume:
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    return Volume.from_sitk(image, source=str(path))


def _voxelmorph(fixed: Volume, moving: Volume) -> Volume:
    """VoxelMorph trained by us on the hippocampus training subjects (`bench/voxelmorph.py`)."""
    from .voxelmorph import register

    return register(fixed, moving)


# name -> (python module that must be importable, registrar)
PEERS: dict[str, tuple[str, Callable[[Volume, Volume], Volume]]] = {
    "affine": ("SimpleITK", _affine),
    "ants_syn": ("ants", _ants_syn),
    "elastix_bspline": ("itk", _elastix_bspline),
    "voxelmorph": ("voxelmorph", _voxelmorph),
}


def available(name: str) -> bool:
    return missing(name) is None


def missing(name: str) -> str | None:
    """Why a peer cannot run here (None when it can): the bench reports this instead of dropping it."""
    module, _ = PEERS[name]
    no_elastix = module == "itk" and importlib.util.find_spec("itk_elastix") is None and not _has_elastix()
    if importlib.util.find_spec(module) is None or no_elastix:
        return f"peer {name!r} is not installed (pip install .[bench])"
    if name == "voxelmorph":
        from .voxelmorph import WEIGHTS

        if not WEIGHTS.exists():
            return f"peer {name!r} is not trained: python -m bench voxelmorph --data-root PATH (writes {WEIGHTS.name})"
    return None


def _has_elastix() -> bool:
    try:
        import itk

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False
