"""The MRML bridge: Slicer nodes <-> PriorReg `Volume`s and displacement fields.

The only part of PriorReg that knows Slicer, and the only place geometry is
converted between LPS (ours, ITK's) and RAS (Slicer's). `slicer` and `vtk`
are imported inside the functions, so this package imports where Slicer is
absent, and torch is not needed here, so it imports in a Slicer where torch is
not installed yet. Functions that create nodes take `scene`, defaulting to
`slicer.mrmlScene`. `register_nodes` (logic.py) is what every module's Logic
calls: nodes in, checked; backend result out, as nodes.
"""

from .logic import RegistrationOutputs, display_outputs, register_nodes
from .segmentations import labels_from_segmentation, segmentation_from_labels
from .transforms import FIXED_VOLUME_ROLE, MOVING_VOLUME_ROLE, field_from_transform_node, transform_node_from_field
from .volumes import node_from_volume, volume_from_node

__all__ = [
    "FIXED_VOLUME_ROLE",
    "MOVING_VOLUME_ROLE",
    "RegistrationOutputs",
    "display_outputs",
    "field_from_transform_node",
    "labels_from_segmentation",
    "node_from_volume",
    "register_nodes",
    "segmentation_from_labels",
    "transform_node_from_field",
    "volume_from_node",
]
