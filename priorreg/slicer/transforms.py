"""Displacement fields <-> transform nodes.

Our field maps a fixed point `x` to its moving point `x + u(x)` (the
resampling direction). In Slicer that is a transform's "from parent"
direction, so the field becomes a grid transform set *from parent*: a moving
volume placed under the node is then shown aligned with the fixed volume, and
Slicer inverts the grid itself wherever it needs "to parent" (models, markups).
"""

from __future__ import annotations

import numpy as np

from ..grid import Grid
from ..volume import Volume
from .geometry import flip_lps_ras, geometry_from_ijk_to_ras, ijk_to_ras
from .scene import resolve_scene, temporary_nodes
from .volumes import require_untransformed

FIXED_VOLUME_ROLE = "fixedVolume"
MOVING_VOLUME_ROLE = "movingVolume"


def transform_node_from_field(field: Volume, name: str, scene=None, fixed_node=None, moving_node=None):
    """A new grid transform node whose "from parent" transform is `field` (LPS mm, on its grid).

    The grid is interpolated trilinearly, as `priorreg.spatial.warp` does, and
    beyond its edges the edge displacement holds, as with "border" padding.
    `fixed_node` and `moving_node`, when given, are recorded as node
    references (roles `FIXED_VOLUME_ROLE`, `MOVING_VOLUME_ROLE`), which MRML
    keeps valid when a scene is saved, reloaded or imported.
    """
    import slicer
    import vtk
    from slicer.util import vtkMatrixFromArray
    from vtk.util import numpy_support

    scene = resolve_scene(scene)
    if field.array.ndim != 4 or field.array.shape[0] != 3:
        raise ValueError(f"a displacement field has 3 components (x, y, z), got an array of shape {field.array.shape}")
    for role, volume_node in ((FIXED_VOLUME_ROLE, fixed_node), (MOVING_VOLUME_ROLE, moving_node)):
        if volume_node is not None and volume_node.GetScene() is not scene:
            raise ValueError(f"{role} node '{volume_node.GetName()}' is not in the scene")

    vectors = flip_lps_ras(np.moveaxis(field.array, 0, -1)).reshape(-1, 3)  # point order: i fastest, as VTK
    grid = vtk.vtkImageData()
    grid.SetDimensions(*field.shape[::-1])
    grid.SetSpacing(*field.spacing)
    grid.SetOrigin(*flip_lps_ras(field.origin))
    grid.GetPointData().SetScalars(numpy_support.numpy_to_vtk(vectors, deep=1, array_type=vtk.VTK_DOUBLE))
    direction = ijk_to_ras(Grid(field.shape, np.ones(3), np.zeros(3), field.direction))  # grid axes in RAS
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(vtkMatrixFromArray(direction))
    transform.SetInterpolationModeToLinear()

    with temporary_nodes(scene) as keep:
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
        node.SetAndObserveTransformFromParent(transform)
        for role, volume_node in ((FIXED_VOLUME_ROLE, fixed_node), (MOVING_VOLUME_ROLE, moving_node)):
            if volume_node is not None:
                node.SetNodeReferenceID(role, volume_node.GetID())
        return keep(node)


def _reference_grid(reference) -> Grid:
    """The LPS grid of a volume node, a `Volume` or a `Grid`."""
    if hasattr(reference, "GetIJKToRASMatrix"):
        import vtk
        from slicer.util import arrayFromVTKMatrix

        require_untransformed(reference)
        if reference.GetImageData() is None:
            raise ValueError(f"reference volume node '{reference.GetName()}' has no voxels")
        matrix = vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(matrix)
        shape = reference.GetImageData().GetDimensions()[::-1]
        return Grid(tuple(shape), *geometry_from_ijk_to_ras(arrayFromVTKMatrix(matrix)))
    return Grid.of(reference)


def field_from_transform_node(node, reference) -> Volume:
    """The displacement field (LPS mm, float64) of any transform node on `reference`'s grid.

    `reference` is a volume node, a `Volume` or a `Grid`. Each voxel centre
    `x` of the grid is mapped by the node's transform from world, the mapping a
    volume placed under the node is resampled with (the transform from parent,
    composed with the node's own parents if it has any), and `u(x)` is the
    moved point minus `x`. Linear, grid, B-spline and composite transforms alike.
    """
    import vtk
    from vtk.util import numpy_support

    if node is None or not node.IsA("vtkMRMLTransformNode"):
        raise ValueError(f"expected a transform node, got {'None' if node is None else node.GetClassName()}")
    grid = _reference_grid(reference)
    points = grid.physical_points().reshape(-1, 3)

    from_world = vtk.vtkGeneralTransform()
    node.GetTransformFromWorld(from_world)
    fixed = vtk.vtkPoints()
    fixed.SetData(numpy_support.numpy_to_vtk(flip_lps_ras(points), deep=1))
    moved = vtk.vtkPoints()
    moved.SetDataTypeToDouble()  # vtkPoints default to float32: millimetres would lose ~1e-5 relative
    from_world.TransformPoints(fixed, moved)
    u = flip_lps_ras(numpy_support.vtk_to_numpy(moved.GetData())) - points
    array = np.ascontiguousarray(np.moveaxis(u.reshape(*grid.shape, 3), -1, 0))
    return Volume(array, grid.spacing, grid.origin, grid.direction, source=f"transform node '{node.GetName()}'")
