"""`Volume`: a voxel array that always carries its physical geometry.

Registration tools fail their users at the boundaries where an array loses its
spacing, origin or direction. Every image, label map and displacement field in
PriorReg therefore travels as a `Volume`, and the only ways in and out of files
are `Volume.read` and `Volume.write` (SimpleITK underneath: NIfTI, NRRD, MHA).

Conventions (see ARCHITECTURE.md):
- `array` is indexed `[k, j, i]` (SimpleITK's `GetArrayFromImage` order), or
  `[c, k, j, i]` for multi-channel data: 4D label files (one channel per label)
  and vector images such as displacement fields (channels x, y, z in mm).
- `spacing`, `origin` and `direction` are in LPS, as in ITK and DICOM. The
  physical point of index `(i, j, k)` is `origin + direction @ (spacing * (i, j, k))`.
- The dtype of the file is kept; nothing is rescaled on read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files import atomic_write

# Single-file formats only, so that a write can be made atomic by one rename.
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# What PriorReg looks for when it lists image files in a folder: the written formats and their header + data forms.
READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class VolumeError(ValueError):
    """Bad image input. The message names the file (when there is one) and the problem."""


def _where(path) -> str:
    return f"{path}: " if path is not None else ""


@dataclass
class Volume:
    """Voxel array `[k, j, i]` or `[c, k, j, i]` with LPS spacing, origin and direction."""

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: str | None = None  # the file it came from, for error messages

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise `VolumeError` for data no registration can be trusted on."""
        where = _where(self.source)
        if self.array.ndim not in (3, 4):
            raise VolumeError(
                f"{where}expected a 3D volume (or 3D with channels), got an array of shape "
                f"{self.array.shape}; 2D images are not supported"
            )
        if 0 in self.array.shape:
            raise VolumeError(f"{where}zero-size axis in shape {self.array.shape}")
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise VolumeError(f"{where}spacing must be positive and finite, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)):
            raise VolumeError(f"{where}origin is not finite: {self.origin}")
        if not np.all(np.isfinite(self.direction)) or abs(np.linalg.det(self.direction)) < 1e-6:
            raise VolumeError(f"{where}singular direction matrix {self.direction.tolist()}")
        if np.issubdtype(self.array.dtype, np.floating) and not np.all(np.isfinite(self.array)):
            bad = int(np.count_nonzero(~np.isfinite(self.array)))
            raise VolumeError(f"{where}{bad} voxels are NaN or infinite")

    # ------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape `(K, J, I)`, without the channel axis."""
        return tuple(self.array.shape[-3:])

    @property
    def channels(self) -> int:
        return self.array.shape[0] if self.array.ndim == 4 else 1

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new Volume on this grid with another array (same spatial shape)."""
        array = np.asarray(array)
        if tuple(array.shape[-3:]) != self.shape:
            raise VolumeError(f"array shape {array.shape} does not fit grid {self.shape}")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy())

    def channel(self, c: int) -> "Volume":
        return self.with_array(self.array[c] if self.array.ndim == 4 else self.array)

    # -------------------------------------------------------------- SimpleITK
    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str | None = None) -> "Volume":
        where = _where(source)
        dim = image.GetDimension()
        ncomp = image.GetNumberOfComponentsPerPixel()
        if dim == 2:
            raise VolumeError(f"{where}2D image (size {image.GetSize()}); PriorReg registers 3D volumes")
        if 0 in image.GetSize():
            raise VolumeError(f"{where}zero-size axis in size {image.GetSize()}")
        if dim == 4:
            if ncomp != 1:
                raise VolumeError(f"{where}4D vector image is not supported")
            # 4D files (e.g. one label per time point) become channels; geometry from the 3D part.
            size = image.GetSize()
            channels = [sitk.Extract(image, (*size[:3], 0), (0, 0, 0, t)) for t in range(size[3])]
            array = np.stack([sitk.GetArrayFromImage(c) for c in channels])
            ref = channels[0]
        elif dim == 3:
            array = sitk.GetArrayFromImage(image)
            if ncomp > 1:
                array = np.moveaxis(array, -1, 0)  # [k, j, i, c] -> [c, k, j, i]
            ref = image
        else:
            raise VolumeError(f"{where}{dim}D image; PriorReg registers 3D volumes")
        if ncomp > 1 and ncomp != 3:
            raise VolumeError(
                f"{where}vector image with {ncomp} components; only 3D vectors (x, y, z) are supported"
            )
        return cls(
            array,
            np.array(ref.GetSpacing()),
            np.array(ref.GetOrigin()),
            np.array(ref.GetDirection()).reshape(3, 3),
            source=source,
        )

    def to_sitk(self, vector: bool = False) -> sitk.Image:
        """SimpleITK image; channels become a 4D image, or vector pixels when `vector`."""
        if self.array.ndim == 3:
            image = sitk.GetImageFromArray(self.array)
        elif vector:
            image = sitk.GetImageFromArray(np.moveaxis(self.array, 0, -1), isVector=True)
        else:
            image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in self.array])
            image.SetSpacing((*self.spacing, 1.0))
            image.SetOrigin((*self.origin, 0.0))
            d4 = np.eye(4)
            d4[:3, :3] = self.direction
            image.SetDirection(d4.ravel().tolist())
            return image
        image.SetSpacing(self.spacing.tolist())
        image.SetOrigin(self.origin.tolist())
        image.SetDirection(self.direction.ravel().tolist())
        return image

    # -------------------------------------------------------------------- IO
    @classmethod
    def read(cls, path: str | os.PathLike) -> "Volume":
        path = Path(path)
        if not path.exists():
            raise VolumeError(f"{path}: file not found")
        if path.is_dir():
            raise VolumeError(f"{path}: is a folder, expected an image file")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
            raise VolumeError(f"{path}: cannot be read as an image ({reason})") from None
        return cls.from_sitk(image, source=str(path))

    def write(self, path: str | os.PathLike, vector: bool = False, compress: bool = True) -> Path:
        """Write atomically: a failed write never leaves a partial or changed file behind."""
        path = Path(path)
        if not str(path).lower().endswith(_SUFFIXES):
            raise VolumeError(f"{path}: unsupported extension, use one of {', '.join(_SUFFIXES)}")
        self.validate()
        image = self.to_sitk(vector=vector)
        suffix = next(s for s in _SUFFIXES if str(path).lower().endswith(s))
        return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress), suffix)

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.array.shape}, dtype={self.array.dtype}, spacing={self.spacing.round(4).tolist()}, "
            f"origin={self.origin.round(3).tolist()}, source={self.source!r})"
        )
