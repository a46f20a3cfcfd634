"""Geometry and tetrahedral meshing of the gland-in-tissue model, with gmsh.

The model is a box of surrounding tissue holding an ellipsoidal gland and, posterior to it, a
cylindrical TRUS probe running through the whole box along the (slightly pitched) superior-
inferior axis. The probe is meshed as a solid region rather than cut out as a hole: all of its
nodes get prescribed displacements (rigid motion plus balloon inflation, see `fem.py`), so the
simulated deformation is defined and invertible everywhere in the box, including the probe's
own volume, which is part of the TRUS field of view.

Why gmsh: its OpenCASCADE kernel does the boolean fragmentation (one conforming mesh across
gland, tissue and probe interfaces) and its size fields grade the mesh from fine at the gland
and probe surfaces to coarse at the box faces, which keeps a simulation to a few seconds. The
pip wheel meshes without a display (no GUI is started; it links the X11/GL client libraries,
which must be installed, but opens no window), and `General.Terminal = 0` keeps it quiet.
"""

from __future__ import annotations

from dataclasses import dataclass

import gmsh
import numpy as np

from .params import SimulationParameters

GLAND, TISSUE, PROBE = 0, 1, 2
REGIONS = ("gland", "tissue", "probe")


class MeshingError(RuntimeError):
    """gmsh could not build the model for these parameters."""


@dataclass(frozen=True)
class TissueMesh:
    """Linear tetrahedra: `nodes` `[N, 3]` mm (FE frame), `tets` `[M, 4]`, `region` `[M]` (GLAND, ...)."""

    nodes: np.ndarray
    tets: np.ndarray
    region: np.ndarray

    def region_nodes(self, region: int) -> np.ndarray:
        """Sorted indices of the nodes of the tetrahedra of `region`."""
        return np.unique(self.tets[self.region == region])

    def volumes(self, displacement: np.ndarray | None = None) -> np.ndarray:
        """Signed volume of every tetrahedron (mm^3), of the deformed mesh when `displacement` `[N, 3]` is given."""
        x = self.nodes if displacement is None else self.nodes + displacement
        v = x[self.tets]
        edges = v[:, 1:] - v[:, :1]
        return np.linalg.det(edges) / 6.0


def build_mesh(params: SimulationParameters) -> TissueMesh:
    """Mesh the model described by `params` (deterministic: same parameters, same mesh)."""
    gmsh.initialize(interruptible=False)
    try:
        gmsh.option.setNumber("General.Terminal", 0)
        gmsh.option.setNumber("General.NumThreads", 1)
        gmsh.model.add("prostate")
        regions = _geometry(params)
        _size_field(params, regions)
        gmsh.model.mesh.generate(3)
        return _extract(regions)
    except Exception as e:  # gmsh reports every failure as a bare Exception
        raise MeshingError(f"gmsh: {e}") from e
    finally:
        gmsh.finalize()


def _geometry(params: SimulationParameters) -> dict[int, list[int]]:
    """OpenCASCADE solids fragmented into one conforming model; volume tags per region."""
    occ = gmsh.model.occ
    h = np.asarray(params.block_half_size)
    box = occ.addBox(*(-h), *(2 * h))
    gland = occ.addSphere(0, 0, 0, 1.0)
    occ.dilate([(3, gland)], 0, 0, 0, *params.gland_semi_axes)
    # A probe longer than the box's diagonal, cut to the box.
    d = params.probe_direction
    length = 4 * float(np.linalg.norm(h))
    start = np.asarray(params.probe_axis_point) - d * length / 2
    probe = occ.addCylinder(*start, *(d * length), params.probe_radius)
    clip = occ.addBox(*(-h), *(2 * h))
    (probe_in,), _ = occ.intersect([(3, probe)], [(3, clip)])
    _, pieces = occ.fragment([(3, box)], [(3, gland), probe_in])
    occ.synchronize()
    gland_tags = [t for _, t in pieces[1]]
    probe_tags = [t for _, t in pieces[2]]
    tissue_tags = [t for _, t in pieces[0] if t not in gland_tags + probe_tags]
    return {GLAND: gland_tags, TISSUE: tissue_tags, PROBE: probe_tags}


def _size_field(params: SimulationParameters, regions: dict[int, list[int]]) -> None:
    """Fine at the gland and probe surfaces, growing linearly to coarse two gland radii away."""
    fine, coarse = params.mesh_size
    surfaces = [
        t
        for region in (GLAND, PROBE)
        for _, t in gmsh.model.getBoundary([(3, v) for v in regions[region]], oriented=False)
    ]
    field = gmsh.model.mesh.field
    distance = field.add("Distance")
    field.setNumbers(distance, "SurfacesList", surfaces)
    field.setNumber(distance, "Sampling", 40)
    threshold = field.add("Threshold")
    field.setNumber(threshold, "InField", distance)
    field.setNumber(threshold, "SizeMin", fine)
    field.setNumber(threshold, "SizeMax", coarse)
    field.setNumber(threshold, "DistMin", 0.5 * fine)
    field.setNumber(threshold, "DistMax", 2 * max(params.gland_semi_axes))
    field.setAsBackgroundMesh(threshold)
    for option in ("MeshSizeExtendFromBoundary", "MeshSizeFromPoints", "MeshSizeFromCurvature"):
        gmsh.option.setNumber(f"Mesh.{option}", 0)
    gmsh.option.setNumber("Mesh.Algorithm3D", 1)  # Delaunay
    gmsh.option.setNumber("Mesh.Optimize", 1)  # removes slivers, whose Jacobians would be noisy


def _extract(regions: dict[int, list[int]]) -> TissueMesh:
    """Nodes used by tetrahedra, renumbered from 0; tetrahedra oriented to positive volume."""
    tag, coords, _ = gmsh.model.mesh.getNodes()
    coords = coords.reshape(-1, 3)
    tets, region = [], []
    for r, volumes in regions.items():
        for v in volumes:
            types, _, nodes = gmsh.model.mesh.getElements(3, v)
            for etype, enodes in zip(types, nodes):
                if etype != 4:  # 4-node tetrahedron
                    raise MeshingError(f"gmsh produced element type {etype} in volume {v}; expected linear tetrahedra")
                tets.append(enodes.reshape(-1, 4))
                region.append(np.full(len(tets[-1]), r, dtype=np.int8))
    tets = np.concatenate(tets)
    used, inverse = np.unique(tets, return_inverse=True)
    lookup = np.full(int(tag.max()) + 1, -1, dtype=np.int64)
    lookup[tag] = np.arange(len(tag))
    mesh = TissueMesh(coords[lookup[used]], inverse.reshape(-1, 4).astype(np.int64), np.concatenate(region))
    negative = mesh.volumes() < 0
    mesh.tets[negative] = mesh.tets[negative][:, [0, 2, 1, 3]]
    return mesh
