"""From a finite-element solution to displacement fields on a TRUS grid (Hu et al. 2018, 2.3-2.4).

Three steps, each a function here:

1. Field of view (`fe_to_image`): the FE model has no image grid, so the TRUS field of view is
   estimated by matching the bounding box of the *deformed* FE gland with the bounding box of
   a real TRUS gland label, per axis (scale and translation), after the fixed rotation
   `MRUS_ORIENTATION` that puts the FE anatomy on the TRUS images' axes.
2. Sampling (`inverse_field`): the paper's regularising fields are *inverse* DDFs, mapping
   deformed positions back to undeformed ones, i.e. the convention of every field in PriorReg:
   a fixed-space (TRUS) point x goes to x + u(x). The P1 deformation is piecewise affine and
   invertible, so the inverse is exact: every voxel centre is located in the deformed mesh and
   the nodal vectors X - x are interpolated there with barycentric weights. Vectors are carried
   to image millimetres by the same per-axis scale, so the field and its Jacobian are those of
   the FE map conjugated by the FE-to-image affine (the Jacobian determinant is unchanged).
   Voxels outside the deformed tissue block (rare: the block is sized to cover the field of
   view) take the value of the nearest voxel inside it.
3. Affine removal (`decompose`): the map is split into a global affine and a local map composed
   after it, the affine found by linear least squares over the grid, leaving the local field
   that a discriminator compares with a network's local DDF.

`random_domain` is the paper's sampling-domain augmentation: the field of view is moved by a
small random affine D before sampling, and the sampled vectors are expressed in the moved
frame, u'(x) = D^-1 u(D x) (linear part of D), which keeps the Jacobian determinant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..data import binary_channels
from ..grid import Grid
from ..volume import Volume, VolumeError
from .fem import NotConverged, Solution
from .mesh import GLAND
from .params import RANGES

# Rows: the TRUS label's physical axes (x, y, z); columns: FE axes (lateral, posterior,
# superior). In the MR-US data set the probe is at the high-i side of every TRUS volume (the
# gland is indented there and the imaging fan opens away from it; see the mean of the 80
# images) and runs along k: FE posterior is physical -x, the probe axis is z, lateral is y.
MRUS_ORIENTATION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

AFFINE_TOLERANCE_MM = 0.01  # largest voxel displacement the local field's residual affine may cause
MAX_AFFINE_ITERATIONS = 8
_CANDIDATES_PER_CHUNK = 500_000  # voxel-in-tetrahedron tests per vectorised batch (memory bound)


def gland_box(labels: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box (LPS mm, low and high corners) of the gland: channel 0 at >= 0.5.

    The box covers whole voxels (centres +- half a voxel), the extent a segmentation means.
    """
    mask = binary_channels(labels.channel(0)).array.astype(bool)
    if not mask.any():
        raise VolumeError(f"{labels.source or 'labels'}: the gland label (channel 0) is empty")
    kji = np.nonzero(mask)
    lo = np.array([kji[2].min(), kji[1].min(), kji[0].min()]) - 0.5
    hi = np.array([kji[2].max(), kji[1].max(), kji[0].max()]) + 0.5
    corners = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    m = Grid.of(labels).index_to_physical
    physical = corners @ m[:3, :3].T + m[:3, 3]
    return physical.min(axis=0), physical.max(axis=0)


def fe_to_image(solution: Solution, box: tuple[np.ndarray, np.ndarray], orientation: np.ndarray = MRUS_ORIENTATION) -> np.ndarray:
    """4x4 map from FE coordinates to LPS mm: the deformed gland's box onto `box`, per axis."""
    gland = solution.mesh.region_nodes(GLAND)
    q = (solution.mesh.nodes[gland] + solution.displacement[gland]) @ np.asarray(orientation).T
    lo_q, hi_q = q.min(axis=0), q.max(axis=0)
    lo, hi = box
    scale = (hi - lo) / (hi_q - lo_q)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale) @ orientation
    m[:3, 3] = lo - scale * lo_q
    return m


def inverse_field(solution: Solution, to_image: np.ndarray, grid: Grid, domain: np.ndarray | None = None) -> tuple[Volume, float]:
    """The inverse DDF on `grid` (mm, LPS; x -> x + u(x) undeformed) and its outside fraction.

    With `domain` D (a 4x4 affine of physical space, see `random_domain`) it is the field of
    D^-1 o phi o D: sampled at the moved points D x, vectors expressed in the moved frame.
    """
    d = np.eye(4) if domain is None else domain
    return _map_field(solution, to_image, grid, np.linalg.inv(d), d)


@dataclass(frozen=True)
class Decomposition:
    """`full` = `local` after `affine`: phi(x) = phi_local(A x + b), fields on one grid (mm).

    `affine` is `[A | b]` (3x4, fixed to moving like the fields); `iterations` counts the
    least-squares fits; `outside_fraction` is that of the local field's sampling points.
    """

    full: Volume
    local: Volume
    affine: np.ndarray
    outside_fraction: float
    iterations: int


def decompose(solution: Solution, to_image: np.ndarray, grid: Grid, domain: np.ndarray | None = None) -> Decomposition:
    """Split the (domain-moved) inverse map into a global affine g and a local map, phi = phi_local o g.

    This is how the registration network combines its two outputs (`adversarial.full_field`:
    the local field composed after the affine) and how the paper decomposes the simulations,
    so the discriminator compares like with like; it also keeps the local field's Jacobian
    determinant positive (det of phi over det of g). The local field is sampled exactly from
    the FE solution, phi(g^-1(y)) - y at the voxel centres y, and g is refined by the least-
    squares affine of that local field until that affine moves no voxel by more than
    `AFFINE_TOLERANCE_MM`: the local field then carries no affine part over the grid.
    """
    d = np.eye(4) if domain is None else domain
    d_inv = np.linalg.inv(d)
    full, outside = _map_field(solution, to_image, grid, d_inv, d)
    local, g = full, np.eye(4)
    x = grid.physical_points()
    for iteration in range(1, MAX_AFFINE_ITERATIONS + 1):
        residual = np.eye(4)
        residual[:3] = fit_affine(local)
        if np.abs(x @ (residual[:3, :3] - np.eye(3)).T + residual[:3, 3]).max() < AFFINE_TOLERANCE_MM:
            return Decomposition(full, local, g[:3].copy(), outside, iteration)
        g = residual @ g
        local, outside = _map_field(solution, to_image, grid, d_inv, d @ np.linalg.inv(g))
    raise NotConverged(f"affine removal: the local field still has an affine part after {MAX_AFFINE_ITERATIONS} fits")


def _map_field(solution: Solution, to_image: np.ndarray, grid: Grid, outer: np.ndarray, inner: np.ndarray) -> tuple[Volume, float]:
    """Field of y -> outer(phi(inner(y))) on `grid`, phi the FE inverse map in image mm; outside fraction.

    `inner` and `outer` are 4x4 affines of physical space. Points inner(y) outside the deformed
    block take the inverse displacement of the nearest point inside it.
    """
    lattice = inner @ grid.index_to_physical
    linear = to_image[:3, :3]
    deformed = (solution.mesh.nodes + solution.displacement) @ linear.T + to_image[:3, 3]
    to_index = np.linalg.inv(lattice)
    vertices = (deformed @ to_index[:3, :3].T + to_index[:3, 3])[solution.mesh.tets]
    values = -solution.displacement @ linear.T  # X - x, in image mm
    u, inside = _interpolate(vertices, values[solution.mesh.tets], grid.shape)
    outside = float(1.0 - inside.mean())
    if not inside.any():
        raise ValueError("the field of view does not overlap the simulated tissue block")
    if outside > 0:
        nearest = ndimage.distance_transform_edt(~inside, sampling=np.asarray(grid.spacing)[::-1], return_distances=False, return_indices=True)
        u = u[tuple(nearest)]
    x = grid.physical_points()
    mapped = x @ inner[:3, :3].T + inner[:3, 3] + u
    field = mapped @ outer[:3, :3].T + outer[:3, 3] - x
    return Volume(np.moveaxis(field, -1, 0), grid.spacing, grid.origin, grid.direction), outside


def _interpolate(vertices: np.ndarray, values: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric interpolation of per-vertex `values` `[M, 4, 3]` at the integer points of a grid.

    `vertices` `[M, 4, 3]` are tetrahedra in continuous index coordinates (i, j, k). Each
    tetrahedron tests the grid points in its bounding box; returns `[K, J, I, 3]` and the mask
    of points inside some tetrahedron.
    """
    size = np.array(shape[::-1])  # (I, J, K)
    lo = np.maximum(np.ceil(vertices.min(axis=1)).astype(np.int64), 0)
    hi = np.minimum(np.floor(vertices.max(axis=1)).astype(np.int64), size - 1)
    extent = np.maximum(hi - lo + 1, 0)
    counts = extent.prod(axis=1)
    edges = np.transpose(vertices[:, 1:] - vertices[:, :1], (0, 2, 1))  # columns v1-v0, v2-v0, v3-v0
    keep = counts > 0
    inverse = np.zeros_like(edges)
    inverse[keep] = np.linalg.inv(edges[keep])
    field = np.zeros((*shape, 3))
    inside = np.zeros(shape, dtype=bool)
    starts = np.cumsum(counts) - counts  # each tetrahedron's first candidate in one global numbering
    bounds = np.searchsorted(starts + counts, np.arange(0, counts.sum(), _CANDIDATES_PER_CHUNK), side="right")
    for first, last in zip(bounds, [*bounds[1:], len(counts)]):
        tets = np.repeat(np.arange(first, last), counts[first:last])
        local = starts[first] + np.arange(len(tets)) - starts[tets]
        ext = extent[tets]
        point = lo[tets] + np.stack([local % ext[:, 0], (local // ext[:, 0]) % ext[:, 1], local // (ext[:, 0] * ext[:, 1])], axis=1)
        lam = np.einsum("nab,nb->na", inverse[tets], point - vertices[tets, 0])
        weights = np.concatenate([1.0 - lam.sum(axis=1, keepdims=True), lam], axis=1)
        hit = (weights >= -1e-9).all(axis=1)
        i, j, k = point[hit].T
        field[k, j, i] = np.einsum("na,nac->nc", weights[hit], values[tets[hit]])
        inside[k, j, i] = True
    return field, inside


def fit_affine(field: Volume) -> np.ndarray:
    """`[A | b]` (3x4) of the least-squares affine x -> A x + b of the map x -> x + u(x), over all voxels."""
    x = Grid.of(field).physical_points().reshape(-1, 3)
    y = x + field.array.reshape(3, -1).T
    centre = x.mean(axis=0)  # centred coordinates keep the normal equations well conditioned
    design = np.c_[x - centre, np.ones(len(x))]
    w = np.linalg.solve(np.einsum("na,nb->ab", design, design), np.einsum("na,nb->ab", design, y))
    a = w[:3].T
    return np.c_[a, w[3] - a @ centre]


def random_domain(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """4x4 physical affine about the field of view's centre: rotation, per-axis scale, shift (`RANGES`)."""
    axis = rng.normal(size=3)
    angle = np.radians(rng.uniform(*RANGES["domain_rotation_deg"]))
    linear = Rotation.from_rotvec(angle * axis / np.linalg.norm(axis)).as_matrix() @ np.diag(rng.uniform(*RANGES["domain_scale"], size=3))
    centre = grid.center
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = centre - linear @ centre + rng.uniform(*RANGES["domain_shift"], size=3)
    return m
