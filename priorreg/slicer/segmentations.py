"""Segmentation nodes <-> integer label `Volume`s.

Registration is evaluated on label maps (Dice, surface distance), whereas
Slicer users draw segmentations. The export goes through Slicer's own logic
so that segments stored on another grid, or in another representation, are
resampled onto the reference volume's grid as Slicer would show them.
"""

from __future__ import annotations

import numpy as np

from ..volume import Volume
from .scene import resolve_scene, temporary_nodes
from .volumes import node_from_volume, require_untransformed, volume_from_node


def labels_from_segmentation(segmentation_node, reference_volume_node, segment_ids=None) -> Volume:
    """Label `Volume` on the reference volume node's grid: segment `segment_ids[n]` has value `n + 1`.

    `segment_ids` defaults to all segments in their order. Where segments
    overlap, the later one wins. Raises `ValueError` for a segmentation with no
    segments, unknown segment IDs, or segments with no voxel on the grid; the
    scene is left as it was.
    """
    import slicer

    name = segmentation_node.GetName()
    segmentation = segmentation_node.GetSegmentation()
    available = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    if not available:
        raise ValueError(f"segmentation '{name}' is empty: it has no segments")
    ids = available if segment_ids is None else list(segment_ids)
    unknown = [s for s in ids if s not in available]
    if unknown or not ids:
        raise ValueError(f"segmentation '{name}': segment IDs {unknown or ids} not among {available}")
    require_untransformed(reference_volume_node)

    scene = segmentation_node.GetScene()
    with temporary_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name}_export")
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume_node):
            raise ValueError(f"Slicer could not export segmentation '{name}' onto '{reference_volume_node.GetName()}'")
        labels = volume_from_node(labelmap)
    if not labels.array.any():
        raise ValueError(
            f"segmentation '{name}': segments {ids} have no voxel on the grid of '{reference_volume_node.GetName()}'"
        )
    labels.source = f"segmentation '{name}'"
    return labels


def segmentation_from_labels(volume: Volume, name: str, scene=None):
    """A new segmentation node with one segment per non-zero label value (named `Label_<value>`).

    Goes through a temporary label-map node, removed afterwards, so that the
    segments keep the label map's grid, oblique or not.
    """
    import slicer

    scene = resolve_scene(scene)
    if not np.issubdtype(volume.array.dtype, np.integer) and volume.array.dtype != bool:
        raise ValueError(f"labels must be integers, got {volume.array.dtype}; threshold or round them first")
    if not volume.array.any():
        raise ValueError("the label volume has no non-zero voxel, so there is no segment to make")

    with temporary_nodes(scene) as keep:
        labelmap = node_from_volume(volume, f"{name}_labels", scene, label=True)
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise ValueError(f"Slicer could not import the labels into segmentation '{name}'")
        return keep(segmentation_node)
