"""Spatial transforms in physical millimetres.

This module is the only place where physical LPS coordinates meet
`torch.nn.functional.grid_sample`'s normalised coordinates. Everything else in
PriorReg speaks millimetres:

- A displacement field `u` is a tensor `[B, 3, K, J, I]` on the *fixed* grid
  holding physical vectors `(x, y, z)` in mm. It maps a fixed point to its
  moving point, `phi(x) = x + u(x)`, and `warped(x) = moving(phi(x))`
  (ITK's displacement-field transform; Slicer's grid transform "from parent").
- A `Grid` is the geometry of a volume (shape `(K, J, I)`, spacing, origin,
  direction in LPS). Fixed and moving images may have different grids: MR and
  ultrasound never share one.
- `grid_sample` is called with `align_corners=True`: normalised -1 and +1 are
  the centres of the first and last voxels, which is exactly where ITK puts
  index 0 and index n-1. Axis order in the normalised grid is (i, j, k).

Why our own code rather than MONAI's `Warp`/`DVF2DDF`: those work in voxel
units on one shared grid, whereas registration across modalities needs fields
in mm between grids of different spacing, origin and direction.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .grid import Grid
from .volume import Volume, VolumeError

ALIGN_CORNERS = True
_MODES = {"linear": "bilinear", "nearest": "nearest"}


def _index_to_normalized(grid: Grid) -> np.ndarray:
    """4x4: index -> normalised grid_sample coordinate, per axis."""
    n = np.array(grid.shape[::-1], dtype=np.float64)  # (I, J, K)
    scale = np.where(n > 1, 2.0 / np.maximum(n - 1, 1), 0.0)  # one-voxel axis: always its centre
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = np.where(n > 1, -1.0, 0.0)
    return m


def _as_batch(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == ndim - 1 else x


def sample(
    image: torch.Tensor,
    grid: Grid,
    points: torch.Tensor,
    mode: str = "linear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Sample `image` `[B, C, K, J, I]` (on `grid`) at physical `points` `[B, ..., 3]` mm.

    Returns `[B, C, ...]`. `padding` is "zeros" (outside the field of view is 0)
    or "border" (nearest edge value, used for displacement fields).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    image = _as_batch(image, 5)
    out_shape = points.shape[:-1]
    pts = points.reshape(points.shape[0], -1, 1, 1, 3)
    to_index = torch.as_tensor(np.linalg.inv(grid.index_to_physical), dtype=pts.dtype, device=pts.device)
    index = pts @ to_index[:3, :3].T + to_index[:3, 3]
    to_norm = torch.as_tensor(_index_to_normalized(grid), dtype=pts.dtype, device=pts.device)
    norm = index * to_norm.diagonal()[:3] + to_norm[:3, 3]
    dtype = image.dtype if image.is_floating_point() else torch.float32
    out = F.grid_sample(
        image.to(dtype),
        norm.to(dtype),
        mode=_MODES[mode],
        padding_mode="border",
        align_corners=ALIGN_CORNERS,
    )
    if padding == "zeros":
        # ITK's rule: a point is inside when its continuous index is within half a voxel of the
        # first and last voxel centres; inside points near the edge take the edge values.
        size = torch.tensor(grid.shape[::-1], dtype=index.dtype, device=index.device)
        inside = ((index >= -0.5) & (index <= size - 0.5)).all(dim=-1)
        out = out * inside.reshape(inside.shape[0], 1, -1, 1, 1).to(out.dtype)
    elif padding != "border":
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    return out.reshape(*out.shape[:2], *out_shape[1:])


def warp(
    moving: torch.Tensor,
    field: torch.Tensor,
    fixed_grid: Grid,
    moving_grid: Grid | None = None,
    mode: str = "linear",
    padding: str = "zeros",
) -> torch.Tensor:
    """`warped(x) = moving(x + u(x))` for every voxel `x` of the fixed grid.

    `moving` is `[B, C, ...]` on `moving_grid` (default: the fixed grid), `field`
    is `[B, 3, K, J, I]` in mm on `fixed_grid`. Differentiable in both.
    """
    field = _as_batch(field, 5)
    base = fixed_grid.points(field.dtype, field.device)
    points = base.unsqueeze(0) + field.movedim(1, -1)
    return sample(moving, moving_grid or fixed_grid, points, mode=mode, padding=padding)


def compose(first: torch.Tensor, then: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Field of `x -> phi_then(phi_first(x))`: `u(x) = u_first(x) + u_then(x + u_first(x))`.

    Both fields are on `grid`. With the resampling convention this is the field
    that warps with `then` first and `first` second: warping a moving image by
    the result equals warping it by `then`, then warping that by `first`.
    """
    return first + warp(then, first, grid, padding="border")


def _affine_matrix(affine: torch.Tensor) -> torch.Tensor:
    """`[B, 12]`, `[B, 3, 4]` or `[B, 4, 4]` (or unbatched) -> `[B, 3, 4]`."""
    a = torch.as_tensor(affine)
    if a.shape[-1] == 12:
        a = a.reshape(*a.shape[:-1], 3, 4)
    elif a.shape[-2:] == (4, 4):
        a = a[..., :3, :]
    elif a.shape[-2:] != (3, 4):
        raise ValueError(f"affine must be 12 parameters, 3x4 or 4x4, got shape {tuple(a.shape)}")
    return a.unsqueeze(0) if a.dim() == 2 else a


def affine_to_field(affine, grid: Grid, center=None) -> torch.Tensor:
    """Displacement field `[B, 3, K, J, I]` (mm) of the physical affine `p -> A (p - c) + c + t`.

    `affine` holds `[A | t]` row-major as 12 parameters, a 3x4 or a 4x4 matrix,
    mapping fixed points to moving points in LPS mm. `center` `c` defaults to
    the origin of physical space (plain homogeneous matrices); networks pass the
    grid centre so that rotations are about the field of view, as ITK does.
    """
    a = _affine_matrix(affine)
    pts = grid.points(a.dtype if a.is_floating_point() else torch.float32, a.device)
    c = torch.zeros(3, dtype=pts.dtype, device=pts.device) if center is None else torch.as_tensor(
        center, dtype=pts.dtype, device=pts.device
    )
    rel = (pts - c).reshape(1, -1, 3)
    moved = rel @ a[:, :, :3].transpose(1, 2).to(pts.dtype) + a[:, None, :, 3].to(pts.dtype) + c
    u = moved - pts.reshape(1, -1, 3)
    return u.reshape(a.shape[0], *grid.shape, 3).movedim(-1, 1)


def integrate_svf(velocity: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement of `exp(v)` for a stationary velocity field (mm)."""
    u = velocity / (2**steps)
    for _ in range(steps):
        u = compose(u, u, grid)
    return u


# ---------------------------------------------------------------- Volume level
def field_volume(field: torch.Tensor, grid: Grid) -> Volume:
    """Wrap one field `[3, K, J, I]` (or `[1, 3, ...]`) as a float64 Volume with its grid."""
    f = field.detach().cpu().double().numpy()
    f = f[0] if f.ndim == 5 else f
    if f.shape[0] != 3 or tuple(f.shape[1:]) != tuple(grid.shape):
        raise VolumeError(f"field of shape {f.shape} does not fit grid {grid.shape}")
    return Volume(f, grid.spacing, grid.origin, grid.direction)


def field_tensor(field: Volume, dtype=torch.float32) -> torch.Tensor:
    """A displacement-field Volume `[3, K, J, I]` as a tensor `[1, 3, K, J, I]`."""
    if field.array.ndim != 4 or field.array.shape[0] != 3:
        raise VolumeError(f"{field.source or 'field'}: a displacement field needs 3 components, got {field.array.shape}")
    return torch.as_tensor(field.array, dtype=dtype).unsqueeze(0)


def field_to_sitk(field: Volume) -> sitk.Image:
    """ITK displacement-field image (vector float64), readable by ITK, ANTs and Slicer."""
    return Volume(field.array.astype(np.float64), field.spacing, field.origin, field.direction).to_sitk(vector=True)


def write_field(field: Volume, path) -> None:
    field_tensor(field)  # validates the layout before anything is written
    Volume(field.array.astype(np.float64), field.spacing, field.origin, field.direction).write(path, vector=True)


def read_field(path) -> Volume:
    volume = Volume.read(path)
    field_tensor(volume)
    return volume


def resample(
    volume: Volume,
    reference: "Volume | Grid",
    field: Volume | None = None,
    mode: str | None = None,
) -> Volume:
    """`volume` resampled onto `reference`'s grid, through `field` (on that grid) when given.

    Integer arrays (labels) default to nearest neighbour and keep their dtype;
    floating arrays default to linear. Outside the volume's field of view is 0.
    """
    grid = Grid.of(reference)
    if mode is None:
        mode = "linear" if np.issubdtype(volume.array.dtype, np.floating) else "nearest"
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    image = torch.as_tensor(array.astype(np.float64 if array.dtype == np.float64 else np.float32))[None]
    if field is None:
        u = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
    else:
        if not grid.matches(field):
            raise VolumeError(f"{field.source or 'field'}: the displacement field must lie on the reference grid")
        u = field_tensor(field, torch.float64)
    out = warp(image, u.to(image.dtype), grid, Grid.of(volume), mode=mode)[0].numpy()
    if not np.issubdtype(volume.array.dtype, np.floating):
        out = np.rint(out) if mode == "nearest" else out
        out = out.astype(volume.array.dtype) if mode == "nearest" else out.astype(np.float32)
    else:
        out = out.astype(volume.array.dtype)
    out = out if volume.array.ndim == 4 else out[0]
    return Volume(out, grid.spacing, grid.origin, grid.direction)
