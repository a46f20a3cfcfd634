"""A real MR-US pair as nodes: what the modules' self-tests (in Slicer) and the MRML test tier register.

Both tiers must run the same flow on the same data, so the nodes are made here, once: the
first pair of the shared MR-US data set's test split (patients no model saw in training),
the images as volume nodes and the prostate gland (label channel 0, thresholded as the
evaluation does) as a segmentation with one segment named "gland" on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import data
from .scene import resolve_scene, temporary_nodes
from .segmentations import segmentation_from_labels
from .volumes import node_from_volume

GLAND = "gland"


@dataclass
class SamplePair:
    id: str
    scene: object  # holding it keeps a scene made for the pair alive: nodes do not keep their scene
    fixed: object  # vtkMRMLScalarVolumeNode (TRUS)
    moving: object  # vtkMRMLScalarVolumeNode (MR)
    fixed_segmentation: object  # vtkMRMLSegmentationNode, one segment GLAND
    moving_segmentation: object
    volumes: data.PairVolumes  # the pair as read from disk


def mrus_test_pair(scene=None, root=None) -> SamplePair:
    """The first test-split MR-US pair as nodes in `scene` (`root`: the data root, see `priorreg.data`)."""
    scene = resolve_scene(scene)
    pair = data.split_by_patient(data.mrus_pairs(root))["test"][0]
    volumes = pair.load()
    with temporary_nodes(scene) as keep:
        fixed = keep(node_from_volume(volumes.fixed, f"{pair.id} TRUS", scene))
        moving = keep(node_from_volume(volumes.moving, f"{pair.id} MR", scene))
        segmentations = []
        for labels, name in ((volumes.fixed_labels, f"{pair.id} TRUS gland"), (volumes.moving_labels, f"{pair.id} MR gland")):
            node = keep(segmentation_from_labels(data.binary_channels(labels).channel(0), name, scene))
            node.GetSegmentation().GetNthSegment(0).SetName(GLAND)
            segmentations.append(node)
    return SamplePair(pair.id, scene, fixed, moving, *segmentations, volumes)


def set_modality(node, modality: str) -> None:
    """Record a volume's DICOM modality where Slicer's DICOM import does: its subject hierarchy item."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemAttribute(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(), modality)
