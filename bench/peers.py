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
from priorreg.methods.baselines import register_affine

THREADS = int(os.environ.get("PRIORREG_BENCH_THREADS", "2"))


def _affine(fixed: Volume, moving: Volume) -> Volume:
    """A plain affine, what a user gets from "just align them": `priorreg.methods.baselines.register_affine`
    (SimpleITK, Mattes mutual information, centres of mass to start). Always available: SimpleITK is a core dependency."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    return register_affine(fixed, moving).field


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
