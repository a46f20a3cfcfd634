"""DeepImagePriorReg: register two volumes by optimising an untrained network on the pair (deep image prior).

Thin by design: the panel is a .ui file bound to a parameter node, the Logic passes explicit
arguments to `priorreg.slicer.logic.register_nodes`. The optimisation runs in Slicer's main
thread and returns to the event loop at every iteration (the progress callback), so Slicer
stays responsive, the panel shows iteration and loss live, and Cancel is honoured at the next
iteration. torch is imported only when Apply runs (and installed then, after asking).
"""

from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from priorreg.registration import Cancelled
from priorreg.slicer.logic import display_outputs, parse_schedule, register_nodes
from priorreg.slicer.panel import JobPanel


class DeepImagePriorReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Deep Image Prior Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["PriorReg developers"]
        self.parent.helpText = (
            "Deformable registration without training data: a randomly initialised network is optimised on this "
            "pair to produce the deformation (deep image prior registration, Laves et al.), coarse to fine. "
            "Segmentations, when given, guide it. Outputs: the warped volume on the fixed grid, a grid transform, "
            "the Jacobian determinant map (folding in yellow) and a metrics table."
        )
        self.parent.acknowledgementText = "PriorReg: deep-learning registration with learned priors."


@parameterNodeWrapper
class DeepImagePriorRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    init: Annotated[str, Choice(["geometry", "centres"])] = "geometry"
    similarity: Annotated[str, Choice(["mae", "lncc", "mse", "local_gradient", "mi"])] = "mae"  # priorreg.methods.common.SIMILARITIES
    levels: str = "2, 1"
    steps: str = "200, 100"
    maxSeconds: Annotated[float, WithinRange(0.0, 86400.0)] = 0.0  # 0: no time budget
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class DeepImagePriorRegWidget(JobPanel, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; the parameter node and the job frame are `priorreg.slicer.panel`'s."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepImagePriorReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.setupPanel(DeepImagePriorRegLogic())

    def lockedWhileRunning(self) -> tuple:
        return (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton)

    def onApplyButton(self) -> None:
        self.runJob("register", self.registerPair)

    def registerPair(self) -> None:
        p = self._parameterNode
        levels, steps = parse_schedule(p.levels, p.steps)
        outputs = self.logic.register(
            p.fixedVolume, p.movingVolume, similarity=p.similarity, steps=steps, levels=levels,
            max_seconds=p.maxSeconds or None, fixed_segmentation=p.fixedSegmentation,
            moving_segmentation=p.movingSegmentation, init=p.init, device=p.device,
            progress=self.onProgress, cancel=self.cancelRequested,
        )
        display_outputs(outputs, p.fixedVolume, p.opacity)
        self.setStatus(f"Done in {outputs.result.seconds:.1f} s: {', '.join(n.GetName() for n in outputs.nodes())}")


class DeepImagePriorRegLogic(ScriptedLoadableModuleLogic):
    """Usable from Slicer's Python console and `Slicer --no-main-window --python-script`."""

    def getParameterNode(self):
        return DeepImagePriorRegParameterNode(super().getParameterNode())

    def register(
        self, fixed, moving, similarity="mae", steps=None, max_seconds=None, levels=None, fixed_segmentation=None,
        moving_segmentation=None, init="geometry", device="auto", progress=None, cancel=None, scene=None,
    ):
        """Register `moving` to `fixed`; returns `priorreg.slicer.RegistrationOutputs` (the new nodes).

        `levels` (downsampling factors, coarse to fine) and `steps` (iterations per level) default
        to the backend's schedule; `max_seconds` caps the run. `init="centres"` first moves the
        moving field of view's centre onto the fixed one (for headers in unrelated frames, as
        MR and ultrasound often are). Raises `ValueError` for unusable inputs and `Cancelled`
        when `cancel()` returns True; either way the scene is left as it was.
        """
        options = {"similarity": similarity, "init": init, "device": device}
        for name, value in (("levels", levels), ("steps", steps), ("max_seconds", max_seconds)):
            if value is not None:
                options[name] = tuple(value) if name != "max_seconds" else float(value)
        return register_nodes(
            fixed, moving, "dip", options, fixed_segmentation, moving_segmentation,
            scene=scene, progress=progress, cancel=cancel,
        )


class DeepImagePriorRegTest(ScriptedLoadableModuleTest):
    """The MRML tier's flows (Testing/mrml/test_modules.py) on Slicer's own scene and application."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_register_with_progress, self.test_cancel_leaves_scene_as_it_was):
            self.setUp()
            test()

    def samplePair(self):
        from priorreg.data import data_root
        from priorreg.slicer.sample import mrus_test_pair

        if not (data_root() / "mrus_prostate").is_dir():
            self.skipTest(f"shared data not found at {data_root()}; set PRIORREG_DATA")
        return mrus_test_pair(slicer.mrmlScene)

    def nodeIDs(self):
        return [slicer.mrmlScene.GetNthNode(n).GetID() for n in range(slicer.mrmlScene.GetNumberOfNodes())]

    def test_register_with_progress(self):
        pair = self.samplePair()
        reports = []
        outputs = DeepImagePriorRegLogic().register(
            pair.fixed, pair.moving, levels=(4,), steps=(10,), init="centres", device="cpu",
            fixed_segmentation=pair.fixed_segmentation, moving_segmentation=pair.moving_segmentation,
            progress=reports.append,
        )
        optimisation = [r for r in reports if r.stage.startswith("dip")]
        self.assertEqual([r.step for r in optimisation], list(range(1, 11)))
        self.assertTrue(all(r.loss == r.loss for r in optimisation))  # not NaN
        self.assertTrue(outputs.warped_volume.IsA("vtkMRMLScalarVolumeNode"))
        self.assertTrue(outputs.transform.IsA("vtkMRMLGridTransformNode"))
        self.assertTrue(outputs.warped_segmentation.IsA("vtkMRMLSegmentationNode"))

    def test_cancel_leaves_scene_as_it_was(self):
        pair = self.samplePair()
        before = self.nodeIDs()
        calls = []

        def cancel():
            calls.append(1)
            return len(calls) > 3

        with self.assertRaises(Cancelled):
            DeepImagePriorRegLogic().register(pair.fixed, pair.moving, levels=(4,), steps=(10,), device="cpu", cancel=cancel)
        self.assertEqual(self.nodeIDs(), before)
