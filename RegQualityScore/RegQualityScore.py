"""RegQualityScore: how much to trust a registration, whichever tool made it.

Thin by design: the panel is a .ui file bound to a parameter node, the Logic passes explicit
arguments to `priorreg.slicer.quality.score_nodes`, which checks the inputs, makes the warped
image and the displacement field when a transform is given, runs the backend's quality report
(AIR-net critic's D-score, calibrated TRE estimate, verdict, Jacobian, plausibility, Dice) and
makes the output nodes. torch is imported only when Apply runs (and installed then, after
asking), so the panel appears in a Slicer without it.
"""

from typing import Annotated

import slicer
import vtk
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from priorreg.registration import Cancelled
from priorreg.slicer.panel import JobPanel, ModelChoice
from priorreg.slicer.quality import (
    DEFAULT_MODEL,
    PLAUSIBILITY_MODEL,
    VERDICT_COLORS,
    critic_summary,
    score_nodes,
    verdict_text,
)

WARPED = "warped volume"
MOVING = "moving volume and transform"


class RegQualityScore(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Registration Quality Score"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["PriorReg developers"]
        self.parent.helpText = (
            "Scores any registration in the scene, from PriorReg, Elastix, ANTs or by hand: give the fixed volume and "
            "either the warped volume (with its transform, optionally) or the moving volume and the transform. An "
            "AIR-net critic scores the pair; a calibration turns the score into an estimated target registration "
            "error with an 80% interval, and a verdict (good, check, failed). With a transform: its Jacobian "
            "determinant map and statistics, and how plausible its deformation is; with segmentations: their Dice."
        )
        self.parent.acknowledgementText = "PriorReg: deep-learning registration with learned priors."


@parameterNodeWrapper
class RegQualityScoreParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    registration: Annotated[str, Choice(["warped volume", "moving volume and transform"])] = WARPED  # WARPED, MOVING
    warpedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    transform: vtkMRMLTransformNode
    fixedSegmentation: vtkMRMLSegmentationNode
    otherSegmentation: vtkMRMLSegmentationNode  # of the warped or of the moving volume, as `registration` says
    model: str = DEFAULT_MODEL  # set from the model combo box, whose items are found at run time
    plausibility: bool = True
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class RegQualityScoreWidget(ModelChoice, JobPanel, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; the parameter node, the job frame and the model choice are `priorreg.slicer.panel`'s."""

    defaultModel = DEFAULT_MODEL

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RegQualityScore.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.resultsTableView.setMRMLScene(slicer.mrmlScene)
        self.showVerdict(None)
        self.setupModelChoice()
        self.setupPanel(RegQualityScoreLogic())

    def onSceneStartClose(self, caller, event) -> None:
        super().onSceneStartClose(caller, event)
        self.ui.resultsTableView.setMRMLTableNode(None)
        self.showVerdict(None)

    def modelCards(self) -> dict:
        from priorreg.models import available_models

        return {name: card for name, card in available_models().items() if card.get("method") == "airnet"}

    def modelSummary(self, card: dict) -> str:
        return critic_summary(card)

    def lockedWhileRunning(self) -> tuple:
        return (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton)

    def updateGUI(self, caller=None, event=None) -> None:
        """Show the inputs of the chosen way in (a warped volume, or a moving volume and transform), and Apply when ready."""
        p = self._parameterNode
        byTransform = p is not None and p.registration == MOVING
        for widget in (self.ui.warpedVolumeLabel, self.ui.warpedVolumeSelector):
            widget.visible = not byTransform
        for widget in (self.ui.movingVolumeLabel, self.ui.movingVolumeSelector):
            widget.visible = byTransform
        self.ui.transformLabel.text = "Transform:" if byTransform else "Transform (optional):"
        self.ui.otherSegmentationLabel.text = "Moving segmentation:" if byTransform else "Warped segmentation:"
        super().updateGUI(caller, event)

    def readyToApply(self) -> tuple[bool, str]:
        p = self._parameterNode
        if p.fixedVolume is None:
            return False, "Select the fixed volume"
        if p.registration == MOVING:
            return p.movingVolume is not None and p.transform is not None, "Select the moving volume and the transform"
        return p.warpedVolume is not None, "Select the warped volume"

    def showVerdict(self, report) -> None:
        """The coloured indicator: green good, amber check, red failed; the estimate and reasons as text."""
        label = self.ui.verdictLabel
        label.visible = report is not None
        if report is not None:
            label.text = verdict_text(report)
            label.styleSheet = f"background-color: {VERDICT_COLORS[report['verdict']]}; color: white; font-weight: bold; padding: 6px"

    def onApplyButton(self) -> None:
        self.runJob("score", self.scoreRegistration)

    def scoreRegistration(self) -> None:
        self.populateModels()  # PyTorch may have just been installed: the cards can be read now
        self.showVerdict(None)
        p = self._parameterNode
        byTransform = p.registration == MOVING
        outputs = self.logic.score(
            p.fixedVolume, warped=None if byTransform else p.warpedVolume, moving=p.movingVolume if byTransform else None,
            transform=p.transform, fixed_segmentation=p.fixedSegmentation,
            warped_segmentation=None if byTransform else p.otherSegmentation,
            moving_segmentation=p.otherSegmentation if byTransform else None,
            model=p.model, plausibility=p.plausibility, device=p.device,
            progress=self.onProgress, cancel=self.cancelRequested,
        )
        warped = outputs.warped_volume or p.warpedVolume
        slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=warped, foregroundOpacity=p.opacity)
        self.ui.resultsTableView.setMRMLTableNode(outputs.table)
        self.showVerdict(outputs.report)
        self.setStatus(f"Scored in {outputs.report['seconds']:.1f} s: {', '.join(n.GetName() for n in outputs.nodes())}")


class RegQualityScoreLogic(ScriptedLoadableModuleLogic):
    """Usable from Slicer's Python console and `Slicer --no-main-window --python-script`."""

    def getParameterNode(self):
        return RegQualityScoreParameterNode(super().getParameterNode())

    def score(
        self, fixed, warped=None, moving=None, transform=None, fixed_segmentation=None, warped_segmentation=None,
        moving_segmentation=None, model=DEFAULT_MODEL, plausibility=True, device="auto", progress=None, cancel=None, scene=None,
    ):
        """Score a registration; returns `priorreg.slicer.quality.QualityOutputs` (the new nodes and the report).

        Give `warped` (any grid; `transform` optional, for the field's statistics), or `moving`
        and `transform` (any transform node: the moving volume is resampled through it).
        `model`: a shipped AIR-net model name or a `.safetensors` path; `plausibility`: judge the
        transform's deformation with the adversarial model's discriminator. Raises `ValueError`
        for unusable inputs and `Cancelled` when `cancel()` returns True; either way the scene
        is left as it was.
        """
        return score_nodes(
            fixed, warped, moving, transform, fixed_segmentation, warped_segmentation, moving_segmentation, model=model,
            plausibility=PLAUSIBILITY_MODEL if plausibility else None, device=device, scene=scene, progress=progress, cancel=cancel,
        )


class RegQualityScoreTest(ScriptedLoadableModuleTest):
    """The MRML tier's flows (Testing/mrml/test_quality_module.py) on Slicer's own scene and application."""

    SHIFT_LPS = (3.0, -2.0, 4.0)  # mm: the known translation the transforms below apply

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_warped_volume, self.test_moving_and_grid_transform, self.test_linear_transform,
            self.test_bad_inputs_change_nothing, self.test_cancel_leaves_scene_as_it_was, self.test_scene_saves_and_reloads_with_the_table,
        ):
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

    def shift(self, pair):
        """The translation as a field on the fixed grid, and the moving volume resampled through it by the backend."""
        import numpy as np

        from priorreg.spatial import Grid, resample
        from priorreg.volume import Volume

        grid = Grid.of(pair.volumes.fixed)
        u = np.broadcast_to(np.array(self.SHIFT_LPS).reshape(3, 1, 1, 1), (3, *grid.shape)).copy()
        field = Volume(u, grid.spacing, grid.origin, grid.direction)
        return field, resample(pair.volumes.moving, field, field, mode="linear")

    def tableRows(self, table):
        return {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}

    def assertJacobianIsOne(self, outputs, pair):
        import numpy as np

        fixedMatrix, jacobianMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        pair.fixed.GetIJKToRASMatrix(fixedMatrix)
        outputs.jacobian.GetIJKToRASMatrix(jacobianMatrix)
        for i in range(4):
            for j in range(4):
                self.assertAlmostEqual(fixedMatrix.GetElement(i, j), jacobianMatrix.GetElement(i, j), places=5)
        self.assertTrue(np.allclose(slicer.util.arrayFromVolume(outputs.jacobian), 1.0, atol=1e-4))

    def test_warped_volume(self):
        from priorreg.quality import quality_report
        from priorreg.slicer import node_from_volume, volume_from_node

        pair = self.samplePair()
        warped = node_from_volume(self.shift(pair)[1], "warped by another tool", slicer.mrmlScene)
        outputs = RegQualityScoreLogic().score(pair.fixed, warped, plausibility=False, device="cpu")
        self.assertTrue(outputs.table.IsA("vtkMRMLTableNode"))
        self.assertIsNone(outputs.jacobian)
        expected = quality_report(volume_from_node(pair.fixed), volume_from_node(warped), model=DEFAULT_MODEL)
        rows = self.tableRows(outputs.table)
        self.assertEqual(rows["verdict"], expected["verdict"])
        self.assertAlmostEqual(float(rows["d_score"]), expected["d_score"], delta=1e-5 * max(1.0, abs(expected["d_score"])))
        self.assertTrue(verdict_text(outputs.report).startswith(f"{expected['verdict']}: "))

    def test_moving_and_grid_transform(self):
        from priorreg.quality import quality_report
        from priorreg.slicer import transform_node_from_field

        pair = self.samplePair()
        field, warped = self.shift(pair)
        transform = transform_node_from_field(field, "shift", slicer.mrmlScene)
        outputs = RegQualityScoreLogic().score(
            pair.fixed, moving=pair.moving, transform=transform, fixed_segmentation=pair.fixed_segmentation,
            moving_segmentation=pair.moving_segmentation, device="cpu",
        )
        expected = quality_report(pair.volumes.fixed, warped, field, model=DEFAULT_MODEL)
        self.assertAlmostEqual(outputs.report["d_score"], expected["d_score"], delta=1e-3 * max(1.0, abs(expected["d_score"])))
        self.assertIn("dice_mean", self.tableRows(outputs.table))
        self.assertJacobianIsOne(outputs, pair)
        self.assertTrue(outputs.warped_volume.IsA("vtkMRMLScalarVolumeNode"))

    def test_linear_transform(self):
        pair = self.samplePair()
        toParent = vtk.vtkMatrix4x4()
        for axis, (shift, flip) in enumerate(zip(self.SHIFT_LPS, (-1.0, -1.0, 1.0))):
            toParent.SetElement(axis, 3, -shift * flip)  # RAS: the moving volume moves by -SHIFT, so it is resampled at +SHIFT
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
        transform.SetMatrixTransformToParent(toParent)
        outputs = RegQualityScoreLogic().score(pair.fixed, moving=pair.moving, transform=transform, device="cpu")
        self.assertJacobianIsOne(outputs, pair)
        self.assertIn("plausibility", outputs.report)

    def test_bad_inputs_change_nothing(self):
        pair = self.samplePair()
        before = self.nodeIDs()
        logic = RegQualityScoreLogic()
        for kwargs, message in (
            ({"fixed": None, "warped": pair.moving}, "no fixed volume"),
            ({"fixed": pair.fixed}, "nothing to score"),
            ({"fixed": pair.fixed, "moving": pair.moving}, "nothing to score"),
            ({"fixed": pair.fixed, "warped": pair.moving, "transform": pair.moving_segmentation}, "not a transform node"),
            ({"fixed": pair.fixed, "warped": pair.moving, "fixed_segmentation": pair.fixed_segmentation}, "only the fixed segmentation"),
            ({"fixed": pair.fixed, "warped": pair.moving, "model": "adversarial_mrus"}, "not an AIR-net critic"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                logic.score(device="cpu", scene=slicer.mrmlScene, **kwargs)
        self.assertEqual(self.nodeIDs(), before)

    def test_cancel_leaves_scene_as_it_was(self):
        from priorreg.slicer import transform_node_from_field

        pair = self.samplePair()
        transform = transform_node_from_field(self.shift(pair)[0], "shift", slicer.mrmlScene)
        before = self.nodeIDs()
        with self.assertRaises(Cancelled):
            RegQualityScoreLogic().score(pair.fixed, moving=pair.moving, transform=transform, device="cpu", cancel=lambda: True)
        self.assertEqual(self.nodeIDs(), before)

    def test_scene_saves_and_reloads_with_the_table(self):
        import tempfile
        from pathlib import Path

        from priorreg.slicer import transform_node_from_field

        pair = self.samplePair()
        transform = transform_node_from_field(self.shift(pair)[0], "shift", slicer.mrmlScene)
        outputs = RegQualityScoreLogic().score(pair.fixed, moving=pair.moving, transform=transform, device="cpu")
        rows, name = self.tableRows(outputs.table), outputs.table.GetName()
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "scored.mrb")
            self.assertTrue(slicer.util.saveScene(path))
            slicer.mrmlScene.Clear()
            slicer.util.loadScene(path)
        table = slicer.mrmlScene.GetFirstNodeByName(name)
        self.assertEqual(self.tableRows(table), rows)
        self.assertEqual(table.GetNodeReference("transform").GetName(), "shift")
