"""The MRML scene a bridge function works in, and leaving it as it was.

Inside Slicer the application scene is `slicer.mrmlScene`; the slicer-core
wheel (tests, headless use) has no application scene, so callers pass one.
"""

from __future__ import annotations

from contextlib import contextmanager


def resolve_scene(scene=None):
    """`scene`, else Slicer's application scene; a clear error where there is none."""
    if scene is not None:
        return scene
    import slicer

    application_scene = getattr(slicer, "mrmlScene", None)
    if application_scene is None:
        raise ValueError("no MRML scene: slicer.mrmlScene exists only inside Slicer, pass scene= explicitly")
    return application_scene


def _node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@contextmanager
def temporary_nodes(scene):
    """Remove the nodes added to `scene` in the block, except those given to the yielded `keep`.

    Slicer's logic functions add helper nodes as side effects (display nodes,
    colour tables, the subject hierarchy), and removing a node does not remove
    its display nodes. A bridge call must leave the scene as it was apart from
    its result, and exactly as it was when it fails: on an error every added
    node goes, kept or not. `keep(node)` keeps the node and, when it is
    displayable, its display nodes (colour and table nodes have none).
    """
    before = set(_node_ids(scene))
    kept: set[str] = set()

    def keep(node):
        kept.add(node.GetID())
        if node.IsA("vtkMRMLDisplayableNode"):
            kept.update(node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes()))
        return node

    succeeded = False
    try:
        yield keep
        succeeded = True
    finally:
        for node_id in reversed(_node_ids(scene)):
            if node_id in before or (succeeded and node_id in kept):
                continue
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)
