"""Scalar and label-map volume nodes <-> `Volume`.

Geometry crosses as the node's IJKToRAS matrix, converted to LPS, so spacing,
origin and an oblique direction survive both ways; voxels are copied, never
shared with VTK memory (a view would change under the user's edits, or
dangle once the node is deleted).
"""

from __future__ import annotations

import numpy as np

from ..grid import Grid
from ..volume import Volume
from .geometry import geometry_from_ijk_to_ras, ijk_to_ras
from .scene import resolve_scene, temporary_nodes

_INT32 = np.iinfo(np.int32)


def require_untransformed(node) -> None:
    """Raise unless `node` sits in world coordinates (no parent transform, or an identity one).

    We raise rather than harden on the user's behalf: hardening a non-linear
    transform resamples the voxels, and whether to do so is the user's choice.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return
    if parent.IsTransformToWorldLinear():
        import vtk
        from slicer.util import arrayFromVTKMatrix

        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        if np.allclose(arrayFromVTKMatrix(to_world), np.eye(4), atol=1e-9):
            return
    raise ValueError(
        f"node '{node.GetName()}' is under transform '{parent.GetName()}': harden the transform first "
        "(Data module: right-click the node, 'Harden transform'), so that its voxels are where Slicer shows them"
    )


def volume_from_node(node) -> Volume:
    """A `Volume` (LPS geometry, same dtype, copied voxels) from a scalar or label-map volume node."""
    import vtk
    from slicer.util import arrayFromVTKMatrix
    from vtk.util import numpy_support

    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "None" if node is None else node.GetClassName()
        raise ValueError(f"expected a scalar or label-map volume node, got {kind}")
    name = node.GetName()
    require_untransformed(node)
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise ValueError(f"volume node '{name}' has no voxels")
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"volume node '{name}' has {scalars.GetNumberOfComponents()} components per voxel, expected 1")
    shape = image.GetDimensions()[::-1]
    array = numpy_support.vtk_to_numpy(scalars).reshape(shape).copy()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    spacing, origin, direction = geometry_from_ijk_to_ras(arrayFromVTKMatrix(matrix))
    return Volume(array, spacing, origin, direction, source=f"volume node '{name}'")


def _vtk_ready(volume: Volume, label: bool) -> np.ndarray:
    """The array in a scalar type Slicer stores and displays, or a clear error."""
    array = volume.array
    if array.ndim != 3:
        raise ValueError(f"a volume node holds one channel; this volume has {volume.channels}, pass volume.channel(c)")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if label and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a label map holds integers, got {array.dtype}; threshold or round it first")
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize == 8:
        # Slicer rejects 64-bit integer voxels (they do not display); int64 is what torch and numpy give labels.
        if array.min() < _INT32.min or array.max() > _INT32.max:
            raise ValueError(f"{array.dtype} values outside the int32 range cannot be stored in a volume node")
        return array.astype(np.int32)
    return array


def node_from_volume(
    volume: Volume,
    name: str,
    scene=None,
    *,
    label: bool = False,
    color_node_id: str | None = None,
    window: float | None = None,
    level: float | None = None,
):
    """A new volume node (label map when `label`) with the volume's geometry and voxels, shown.

    The display node uses automatic window/level unless `window` and `level`
    are given, and the scene's colour node `color_node_id` when given (for
    example a diverging table for a Jacobian determinant map).
    """
    import vtk
    from slicer.util import vtkMatrixFromArray
    from vtk.util import numpy_support

    scene = resolve_scene(scene)
    array = _vtk_ready(volume, label)
    if (window is None) != (level is None):
        raise ValueError("give both window and level, or neither for automatic window/level")
    if label and window is not None:
        raise ValueError("window/level do not apply to a label map")
    if color_node_id is not None and scene.GetNodeByID(color_node_id) is None:
        raise ValueError(f"colour node '{color_node_id}' is not in the scene")

    with temporary_nodes(scene) as keep:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode", name)
        image = vtk.vtkImageData()
        image.SetDimensions(*array.shape[::-1])
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=1))
        node.SetIJKToRASMatrix(vtkMatrixFromArray(ijk_to_ras(Grid.of(volume))))
        node.SetAndObserveImageData(image)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if color_node_id is not None:
            display.SetAndObserveColorNodeID(color_node_id)
        if window is not None:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(window, level)
        return keep(node)
