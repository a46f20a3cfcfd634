"""Registration pairs with a known answer: seeded deformations of co-registered multimodal brain scans.

Seed 002 (Deform-GAN) scores multimodal T1-to-T2 registration on scans whose sequences are
already aligned: a synthetic deformation (shift, rotation, scaling and an elastic part) is
applied, and the registration must recover it. The shared data holds such sets
(`data.multimodal_sets`: a stroke patient with T1, T2, FLAIR and two tumour studies with T1
pre/post-contrast, T2, FLAIR), so the error of an estimated field is measurable voxel by voxel
(end-point error, EPE) instead of through labels or landmarks.

The pair is built so that no inverse is ever needed. With a known field `u` on the set's
grid (PriorReg's convention: `phi(x) = x + u(x)` maps a fixed point to its moving point):

- fixed(x) = reference(x + u(x)): the reference modality (T2 or FLAIR) resampled through `u`;
- moving = the original T1 (T1pre for the tumour studies), untouched.

Every modality of a set shares one grid and one anatomy, so fixed(x) shows the anatomy that
the moving image has at `x + u(x)`: the true field of (fixed, moving) is exactly `u`, and the
ground-truth warped moving image is T1(x + u(x)). Inverting `u` numerically (and the error
that brings) is never required.

Sizes: the tumour studies are 512x512x22 (0.43 mm in-plane, 6.5 mm slices) and 280x320x22,
the stroke set 124x160x140 at 1 mm. `max_voxels` puts a set on a coarser grid over the same
field of view first (finest axes coarsened first; the tumours' 6.5 mm slices stay), so that
evaluating slow methods stays affordable; `EVAL_MAX_VOXELS` is seed 002's input size.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import data
from .filters import gaussian_kernel, gaussian_smooth_mm
from .spatial import Grid, resample, sample
from .volume import Volume

# Seed 002 cropped and downsized BraTS to 112x128x96 voxels; evaluation uses at most as many.
EVAL_MAX_VOXELS = 112 * 128 * 96
# The scored region: voxels brighter than this fraction of the T2's 99th percentile. The tumour
# studies are not brain-extracted and their air holds noise up to ~3% of that (the stroke set's
# background is exactly 0), so "T2 > 0" would score the whole field of view there.
FOREGROUND_FRACTION = 0.1
# (moving, fixed) modality names per kind of set: T1 (T1pre: before contrast, as seed 002's T1)
# is registered to T2 and to FLAIR.
MOVING = {"stroke": "T1", "tumor": "T1pre"}
_FIXED = ("T2", "FLAIR")
_MASK_MODALITY = "T2"  # CSF is bright in T2 (dark in FLAIR and T1): its foreground has no holes
# Learned methods (seed 002's Deform-GAN) train on some sets and are scored on another: two sets
# train, one is held back. Training keeps one scan of each kind (1 mm isotropic, 6.5 mm slices);
# `priorreg evaluate --task brain_t1t2 --split test` scores the held-back set only.
SPLIT = {"train": ("stroke", "tumor_Study1"), "test": ("tumor_Study3",)}


@dataclass(frozen=True)
class Magnitudes:
    """Largest parts of a random known deformation (each drawn uniformly up to its bound).

    Moderate on purpose: together they move the edge of a 100 mm brain by up to about 30 mm
    (rotation ~14 mm at 80 mm from the centre, scaling 8 mm, shift 10 mm, elastic 5 mm) with no
    folding, which is the range registration methods are expected to recover from a
    header-aligned start; seed 002's "up to 40 voxels" is a stress test, not a default.

    - `rotation_deg`: rotation about a random axis through the grid centre, angle in [-r, r].
    - `scaling`: per physical axis (x, y, z) a factor in [1 - s, 1 + s], about the grid centre.
    - `shift_mm`: translation in a random direction, length in [0, t] mm.
    - `elastic_mm`: peak length (mm) of a smooth random field: Gaussian-smoothed white noise
      (`elastic_sigma_mm`), rescaled so that its largest vector on the grid is exactly this long
      (its mean length is then about a third of it). With a 15 mm Gaussian its gradients stay
      well below 1, so the deformation does not fold.
    """

    rotation_deg: float = 10.0
    scaling: float = 0.10
    shift_mm: float = 10.0
    elastic_mm: float = 5.0
    elastic_sigma_mm: float = 15.0


DEFAULTS = Magnitudes()
UNDEFORMED = Magnitudes(rotation_deg=0.0, scaling=0.0, shift_mm=0.0, elastic_mm=0.0)  # the control: the true field is 0


# --------------------------------------------------------------------------- the deformation
def rotation_matrix(axis, angle_deg: float) -> np.ndarray:
    """3x3 rotation by `angle_deg` about `axis` (Rodrigues' formula; exactly I for angle 0)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    theta = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-12)


def random_affine(
    rng: np.random.Generator, rotation_deg: float, scaling: float, shift_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded `(A, t)`: `A = R S` (rotation, per-axis scaling), `t` a shift in mm (LPS)."""
    rotation = rotation_matrix(_unit_vector(rng), rng.uniform(-rotation_deg, rotation_deg))
    scale = np.diag(rng.uniform(1 - scaling, 1 + scaling, size=3))
    shift = _unit_vector(rng) * rng.uniform(0, shift_mm)
    return rotation @ scale, shift


def affine_displacement(grid: Grid, matrix, shift, center=None) -> torch.Tensor:
    """`[1, 3, K, J, I]` mm (float64) of `p -> A (p - c) + c + t`, `c` the grid centre by default.

    Written as `(A - I)(p - c) + t` rather than `spatial.affine_to_field`'s `A (p - c) + c + t - p`
    (the same map): no cancellation of large coordinates, and exactly zero for `A = I, t = 0`.
    """
    c = grid.center if center is None else np.asarray(center, dtype=np.float64)
    rel = grid.physical_points() - c  # [K, J, I, 3]
    u = rel @ (np.asarray(matrix, dtype=np.float64) - np.eye(3)).T + np.asarray(shift, dtype=np.float64)
    return torch.as_tensor(np.moveaxis(u, -1, 0)[None])


def elastic_displacement(grid: Grid, rng: np.random.Generator, peak_mm: float, sigma_mm: float) -> torch.Tensor:
    """`[1, 3, K, J, I]` mm (float64): a smooth random field whose longest vector on `grid` is `peak_mm`.

    White noise on a lattice of `sigma_mm / 3` spacing (the grid's directions) that extends
    `3 sigma_mm` beyond the field of view, smoothed by a Gaussian of `sigma_mm` and interpolated
    (linearly) at the grid's voxels. The margin keeps the field statistically the same up to the
    edges (a smoothed field cut at the border would put its peaks there), and the lattice makes
    the field independent of the grid's voxel size: `max_voxels` does not change it.
    """
    if peak_mm == 0:
        return torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
    step, margin = sigma_mm / 3, 3 * sigma_mm
    extent = (np.array(grid.shape[::-1]) - 1) * np.asarray(grid.spacing)  # (x, y, z) along the grid axes
    size = np.ceil((extent + 2 * margin) / step).astype(int) + 1
    lattice = Grid(tuple(int(x) for x in size[::-1]), np.full(3, step), grid.origin - grid.direction @ np.full(3, margin), grid.direction)
    noise = torch.as_tensor(rng.standard_normal((1, 3, *lattice.shape)))
    smooth = gaussian_smooth_mm(noise, lattice, sigma_mm)
    u = sample(smooth.float(), lattice, grid.points(torch.float32)[None], mode="linear", padding="border").double()
    return u * (peak_mm / u.norm(dim=1).max().clamp_min(1e-12))


def random_deformation(
    grid: Grid | Volume,
    seed: int = 0,
    rotation_deg: float = DEFAULTS.rotation_deg,
    scaling: float = DEFAULTS.scaling,
    shift_mm: float = DEFAULTS.shift_mm,
    elastic_mm: float = DEFAULTS.elastic_mm,
    elastic_sigma_mm: float = DEFAULTS.elastic_sigma_mm,
) -> Volume:
    """A seeded known displacement field on `grid`: `[3, K, J, I]` float32 in mm (LPS).

    `phi(x) = x + u(x)` with `u = u_affine + u_elastic`: the affine part (rotation, scaling and
    shift about the grid centre, see `Magnitudes`) plus a smooth elastic part. The sum of two
    displacements on the fixed grid is itself a field in PriorReg's convention, so no
    composition (and no resampling of one field by the other) is needed. All magnitudes 0:
    exactly zero.
    """
    grid = Grid.of(grid)
    rng = np.random.default_rng(seed)
    matrix, shift = random_affine(rng, rotation_deg, scaling, shift_mm)
    u = affine_displacement(grid, matrix, shift) + elastic_displacement(grid, rng, elastic_mm, elastic_sigma_mm)
    return Volume(u[0].numpy().astype(np.float32), grid.spacing, grid.origin, grid.direction)


# ------------------------------------------------------------------------- grids and masks
def working_grid(grid: Grid | Volume, max_voxels: int | None = None) -> Grid:
    """`grid`, or a coarser grid over the same field of view with at most `max_voxels` voxels.

    The first and last voxel centres are kept (as `Grid.scaled`), and only axes finer than a
    common spacing `s` are coarsened to about `s`: the tumour studies lose in-plane resolution
    first, never their already coarse 6.5 mm slices. `s` is the smallest that fits (bisection).
    """
    grid = Grid.of(grid)
    if max_voxels is None or int(np.prod(grid.shape)) <= max_voxels:
        return grid
    n = np.array(grid.shape[::-1], dtype=np.float64)  # (I, J, K), like spacing
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    extent = (n - 1) * spacing

    def shape_at(s: float) -> np.ndarray:
        return np.where(n > 1, np.ceil(extent / np.maximum(spacing, s) - 1e-9) + 1, 1)

    low, high = spacing.min(), max(extent.max(), spacing.max())
    if np.prod(shape_at(high)) > max_voxels:
        raise ValueError(f"max_voxels={max_voxels} is too small for a grid of shape {grid.shape}")
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if np.prod(shape_at(mid)) <= max_voxels else (mid, high)
    m = shape_at(high)
    new_spacing = np.where(m > 1, extent / np.maximum(m - 1, 1), spacing)
    return Grid(tuple(int(x) for x in m[::-1]), new_spacing, grid.origin.copy(), grid.direction.copy())


def _smooth_axes(x: torch.Tensor, sigmas_voxels) -> torch.Tensor:
    """Gaussian along each axis (k, j, i) of `[1, 1, K, J, I]` with its own sigma in voxels."""
    for dim, sigma in zip((2, 3, 4), sigmas_voxels):
        kernel = gaussian_kernel(float(sigma))
        if kernel is None or x.shape[dim] < 2:
            continue
        r = kernel.numel() // 2
        y = x.movedim(dim, -1)
        shape = y.shape
        y = F.pad(y.reshape(-1, 1, shape[-1]), (r, r), mode="replicate")
        y = F.conv1d(y, kernel.to(y.dtype).view(1, 1, -1)).reshape(shape)
        x = y.movedim(-1, dim)
    return x


def on_grid(volume: Volume, grid: Grid, field: Volume | None = None) -> Volume:
    """`volume` as float32 on `grid` (linear, through `field` on `grid` when given), smoothed first where `grid` is coarser.

    The anti-aliasing Gaussian has `(s_new / s_old - 1) / 2` old voxels of sigma per axis
    (skimage's rule); on the volume's own grid (and no field) this is a plain float32 copy.
    """
    array = volume.array.astype(np.float32)
    if field is None and Grid.of(volume).matches(grid):
        return volume.with_array(array)
    ratio = (np.asarray(grid.spacing) / volume.spacing)[::-1]  # per (k, j, i)
    smooth = _smooth_axes(torch.as_tensor(array)[None, None], np.maximum(ratio - 1, 0) / 2)[0, 0]
    return resample(volume.with_array(smooth.numpy()), grid, field, mode="linear")


def foreground(volume: Volume, fraction: float = FOREGROUND_FRACTION) -> Volume:
    """uint8 mask of the voxels brighter than `fraction` of the 99th percentile (see FOREGROUND_FRACTION)."""
    a = volume.array.astype(np.float32)
    return volume.with_array((a > fraction * np.percentile(a, 99)).astype(np.uint8))


# ---------------------------------------------------------------------------------- metrics
def end_point_error(field: Volume, true_field: Volume, mask: Volume | np.ndarray | None = None) -> dict:
    """`epe_mm` (mean) and `epe_median_mm` of `|u - u_true|` in mm over `mask` (all voxels if None).

    Both fields lie on the fixed grid and hold physical vectors, so the length of their
    difference is the distance between the estimated and the true moving point of each voxel.
    """
    if not Grid.of(field).matches(true_field):
        raise ValueError("end_point_error: the estimated field must lie on the true field's grid (the fixed grid)")
    error = np.linalg.norm(field.array.astype(np.float64) - true_field.array.astype(np.float64), axis=0)
    if mask is not None:
        error = error[np.asarray(mask.array if isinstance(mask, Volume) else mask).astype(bool)]
    if error.size == 0:
        return {"epe_mm": float("nan"), "epe_median_mm": float("nan")}
    return {"epe_mm": float(error.mean()), "epe_median_mm": float(np.median(error))}


# ------------------------------------------------------------------------------------ pairs
class KnownPairVolumes(NamedTuple):
    """What `KnownDeformationPair.load` returns: `PairVolumes`' fields (same names) and the answer.

    `true_field` is the registration field of (fixed, moving); `true_warped` is the moving
    image warped by it (linearly); `mask` (uint8, fixed grid) is the scored region: the set's
    T2 foreground carried through the deformation, i.e. the head as the fixed image shows it.
    """

    fixed: Volume
    moving: Volume
    fixed_labels: Volume | None
    moving_labels: Volume | None
    true_field: Volume
    true_warped: Volume
    mask: Volume


@dataclass(frozen=True)
class KnownDeformationPair(data.Pair):
    """A `data.Pair` whose fixed image is `fixed` (the reference modality) deformed by a known field.

    `fixed` and `moving` name the original co-registered files; `load()` builds the deformed
    fixed image. `mask_source` is the image whose foreground is scored (the set's T2).
    """

    mask_source: Path | None = None
    deformation_seed: int = 0
    max_voxels: int | None = None
    magnitudes: Magnitudes = DEFAULTS

    def load(self) -> KnownPairVolumes:
        reference = Volume.read(self.fixed)
        grid = working_grid(reference, self.max_voxels)
        moving = on_grid(Volume.read(self.moving), grid)
        u = random_deformation(grid, self.deformation_seed, **asdict(self.magnitudes))
        fixed = resample(on_grid(reference, grid), grid, u, mode="linear")
        mask_image = reference if self.mask_source in (None, self.fixed) else Volume.read(self.mask_source)
        mask = resample(foreground(on_grid(mask_image, grid)), grid, u, mode="nearest")
        return KnownPairVolumes(fixed, moving, None, None, u, resample(moving, grid, u, mode="linear"), mask)


def deformation_seed(seed: int, set_name: str, index: int) -> int:
    """The seed of deformation `index` of a set: distinct per set and index, stable across runs."""
    return int(np.random.SeedSequence([seed, zlib.crc32(set_name.encode()), index]).generate_state(1)[0])


def known_deformation_pairs(
    root: str | os.PathLike | None = None,
    n: int = 2,
    seed: int = 0,
    max_voxels: int | None = None,
    magnitudes: Magnitudes = DEFAULTS,
) -> list[KnownDeformationPair]:
    """`n` seeded deformations of every co-registered set, each as T1 -> T2 and T1 -> FLAIR.

    T1 is the moving image (T1pre for the tumour studies); both fixed modalities of one set
    and index share one deformation. Ids read `<set>_<moving>_to_<fixed>_<index>`, e.g.
    `stroke_T1_to_T2_0`. Ordered by index, then fixed modality, then set, so that the first
    pairs are T1 -> T2 on every set (seed 002's pairing): `pairs[:k]` is a balanced sample.
    """
    sets = data.multimodal_sets(root)
    pairs = []
    for index in range(n):
        for fixed_modality in _FIXED:
            for name, files in sorted(sets.items()):
                moving_modality = MOVING[name.split("_")[0]]
                missing = [m for m in (moving_modality, fixed_modality, _MASK_MODALITY) if m not in files]
                if missing:
                    raise FileNotFoundError(f"multimodal set {name!r} lacks {missing}; is the data root complete?")
                pairs.append(
                    KnownDeformationPair(
                        id=f"{name}_{moving_modality}_to_{fixed_modality}_{index}",
                        fixed=files[fixed_modality],
                        moving=files[moving_modality],
                        group=name,
                        mask_source=files[_MASK_MODALITY],
                        deformation_seed=deformation_seed(seed, name, index),
                        max_voxels=max_voxels,
                        magnitudes=magnitudes,
                    )
                )
    return pairs
