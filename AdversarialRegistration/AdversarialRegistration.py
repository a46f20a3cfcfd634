"""AdversarialRegistration: register two volumes with a trained network (Hu et al. 2018).

Thin by design: the panel is a .ui file bound to a parameter node, the Logic passes explicit
arguments to `priorreg.slicer.logic.register_nodes`, which checks the inputs, runs the backend
and makes the output nodes. torch is imported only when Apply runs (and installed then, after
asking), so the panel appears in a Slicer without it.
"""

from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from priorreg.models import FINETUNED
from priorreg.registration import Cancelled
from priorreg.slicer.logic import (
    REGISTRATION_NETWORKS,
    display_outputs,
    matching_critic,
    model_card,
    model_summary,
    register_nodes,
    registration_models,
)
from priorreg.slicer.panel import JobPanel, ModelChoice
from priorreg.slicer.quality import verdict_text

DEFAULT_MODEL = "adversarial_mrus"
MATCHING_CRITIC = "matching"  # score with a shipped critic trained on the model's data set, where there is one


class AdversarialRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Adversarial Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["PriorReg developers"]
        self.parent.helpText = (
            "Deformable registration with a trained network: adversarial deformation regularization (Hu et al., "
            "2018; MR to TRUS, one forward pass, optionally fine-tuned on the current pair), MR to TRUS through the gland "
            "(trained segmenters outline it in both images, the outlines are registered; segmentations given replace them) "
            "or symmetric spatial-gradient registration (Estienne et al., 2020; brain MR). The model's card says which. Outputs: the moving "
            "volume warped onto the fixed grid, a grid transform usable on segmentations and markups, the "
            "Jacobian determinant map (folding in yellow) and a metrics table."
        )
        self.parent.acknowledgementText = "PriorReg: deep-learning registration with learned priors."


@parameterNodeWrapper
class AdversarialRegistrationParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    model: str = DEFAULT_MODEL  # set from the model combo box, whose items are found at run time
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    finetuneSteps: Annotated[int, WithinRange(0, 5000)] = 0
    trainIterations: Annotated[int, WithinRange(1, 100000)] = 2000
    trainRegularizer: Annotated[str, Choice(["bending", "adversarial", "l2", "none"])] = "bending"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class AdversarialRegistrationWidget(ModelChoice, JobPanel, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; the parameter node, the job frame and the model choice are `priorreg.slicer.panel`'s."""

    defaultModel = DEFAULT_MODEL

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AdversarialRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.setupModelChoice()
        self.setupPanel(AdversarialRegistrationLogic())

    def modelCards(self) -> dict:
        return registration_models()

    def modelSummary(self, card: dict) -> str:
        return model_summary(card)

    def lockedWhileRunning(self) -> tuple:
        return (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton, self.ui.trainCollapsibleButton)

    def onTrainProgress(self, row: dict, total: int) -> None:
        val = f", validation Dice {row['val_dice']:.3f}" if isinstance(row.get("val_dice"), float) else ""
        label = f"label loss {row.get('label', float('nan')):.4f}"
        self.showProgress(row["iteration"], total, f"Training: iteration {row['iteration']} of {total}, {label}{val}")

    def onApplyButton(self) -> None:
        self.runJob("register", self.registerPair)

    def registerPair(self) -> None:
        self.populateModels()  # PyTorch may have just been installed: the cards can be read now
        self.setStatus("Loading the model...")
        slicer.app.processEvents()
        p = self._parameterNode
        outputs = self.logic.register(
            p.fixedVolume, p.movingVolume, model=p.model, device=p.device,
            fixed_segmentation=p.fixedSegmentation, moving_segmentation=p.movingSegmentation,
            finetune_steps=p.finetuneSteps, progress=self.onProgress, cancel=self.cancelRequested,
        )
        display_outputs(outputs, p.fixedVolume, p.opacity)
        done = f"Done in {outputs.result.seconds:.1f} s: {', '.join(n.GetName() for n in outputs.nodes())}"
        quality = f"\nQuality {verdict_text(outputs.quality)}" if outputs.quality else ""
        self.setStatus(done + quality, error=bool(outputs.quality) and outputs.quality["verdict"] == "failed")

    def onTrainButton(self) -> None:
        if not self._running and not (self.ui.trainFolderPathLineEdit.currentPath and self.ui.trainOutputPathLineEdit.currentPath):
            self.setStatus("Choose the folder of pairs and an output folder to train into.", error=True)
            return
        self.runJob("train", self.trainOnFolder, cancelled=None)  # the message says that training resumes

    def trainOnFolder(self) -> None:
        self.setStatus("Reading the pairs...")
        slicer.app.processEvents()
        p = self._parameterNode
        model = self.logic.train(
            self.ui.trainFolderPathLineEdit.currentPath, self.ui.trainOutputPathLineEdit.currentPath,
            iterations=p.trainIterations, regularizer=p.trainRegularizer, device=p.device,
            simulations=self.ui.trainSimulationsPathLineEdit.currentPath or None,
            progress=self.onTrainProgress, cancel=self.cancelRequested,
        )
        self.addModel(str(model))
        self.setStatus(f"Trained {model.name}; it is now the selected model.")


class AdversarialRegistrationLogic(ScriptedLoadableModuleLogic):
    """Usable from Slicer's Python console and `Slicer --no-main-window --python-script`."""

    def getParameterNode(self):
        return AdversarialRegistrationParameterNode(super().getParameterNode())

    def register(
        self, fixed, moving, model=DEFAULT_MODEL, device="auto", fixed_segmentation=None, moving_segmentation=None,
        finetune_steps=0, progress=None, cancel=None, scene=None, quality_model=MATCHING_CRITIC,
    ):
        """Register `moving` to `fixed`; returns `priorreg.slicer.RegistrationOutputs` (the new nodes).

        `model`: a shipped model name or a `.safetensors` path; its card's method (adversarial,
        symmetric, deformgan, glands: segment the gland in both images, register the segmentations,
        or segreg: the same for the structures of one modality, e.g. the hippocampus) is run.
        `finetune_steps` > 0 first tunes a copy of an adversarial or symmetric network on this
        pair, on the segmentations (both needed), or of a deformgan network on the images (its
        training loss, no segmentations needed); a glands model takes the segmentations' first
        segments as the glands, in place of its own, and a segreg model their segments as its
        structures, in its card's order. `quality_model`: the AIR-net critic that scores the
        result (`outputs.quality`); by default a shipped critic trained on the model's data set, none
        where there is no such critic; None: no score. Raises `ValueError` for unusable inputs and
        `Cancelled` when `cancel()` returns True; either way the scene is left as it was.
        """
        card = model_card(model)
        method = card.get("method")
        if method not in REGISTRATION_NETWORKS:
            raise ValueError(f"model '{model}' is a {method!r} model; choose a registration network ({', '.join(REGISTRATION_NETWORKS)})")
        if finetune_steps and method not in FINETUNED:
            raise ValueError(f"model '{model}' is a {method!r} model; fine-tuning is for {', '.join(FINETUNED)} networks")
        if quality_model == MATCHING_CRITIC:
            quality_model = matching_critic(card)
        options = {"model": model, "device": device}
        if finetune_steps:
            options["finetune_steps"] = finetune_steps
        return register_nodes(
            fixed, moving, method, options, fixed_segmentation, moving_segmentation,
            scene=scene, progress=progress, cancel=cancel, quality_model=quality_model,
        )


    def train(
        self, folder, out, iterations=2000, regularizer="bending", simulations=None, device="auto", progress=None, cancel=None,
    ) -> Path:
        """Train a registration network on a folder of your own pairs; returns the model file (`out/<out's name>.safetensors`).

        The layout (one subfolder per pair: fixed, moving, fixed_labels, moving_labels) is
        `priorreg.data.folder_pairs`'; the recipe is seed 000's label-driven training
        (`priorreg.train.folder_config`). `progress(row, total)` gets each logged iteration.
        `cancel()` is asked every iteration: training stops, what was trained stays in `out`
        and the same call resumes it. Raises `ValueError` on a folder that cannot be trained
        from. The scene is not touched: pass the file as `model` to `register`.
        """
        from priorreg.train import folder_config, train

        out = Path(out)
        train(folder_config(folder, out.name, iterations, regularizer, simulations, device), out, progress, cancel)
        return out / f"{out.name}.safetensors"


class AdversarialRegistrationTest(ScriptedLoadableModuleTest):
    """The MRML tier's flows (Testing/mrml/test_modules.py) on Slicer's own scene and application."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_register_outputs, self.test_bad_inputs_change_nothing, self.test_cancel_leaves_scene_as_it_was,
            self.test_train_on_a_folder_cancel_resume_and_register,
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

    def test_register_outputs(self):
        from priorreg.slicer import FIXED_VOLUME_ROLE, MOVING_VOLUME_ROLE

        pair = self.samplePair()
        outputs = AdversarialRegistrationLogic().register(
            pair.fixed, pair.moving, device="cpu", fixed_segmentation=pair.fixed_segmentation,
            moving_segmentation=pair.moving_segmentation,
        )
        self.assertTrue(outputs.warped_volume.IsA("vtkMRMLScalarVolumeNode"))
        self.assertTrue(outputs.transform.IsA("vtkMRMLGridTransformNode"))
        self.assertTrue(outputs.metrics.IsA("vtkMRMLTableNode"))
        self.assertEqual(outputs.transform.GetNodeReferenceID(FIXED_VOLUME_ROLE), pair.fixed.GetID())
        self.assertEqual(outputs.transform.GetNodeReferenceID(MOVING_VOLUME_ROLE), pair.moving.GetID())
        fixedMatrix, warpedMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        pair.fixed.GetIJKToRASMatrix(fixedMatrix)
        outputs.warped_volume.GetIJKToRASMatrix(warpedMatrix)
        for i in range(4):
            for j in range(4):
                self.assertAlmostEqual(fixedMatrix.GetElement(i, j), warpedMatrix.GetElement(i, j), places=5)
        display_outputs(outputs, pair.fixed, opacity=0.3)
        self.assertEqual(outputs.transform.GetDisplayNode().GetRegionNode().GetID(), pair.fixed.GetID())

    def test_bad_inputs_change_nothing(self):
        pair = self.samplePair()
        before = self.nodeIDs()
        logic = AdversarialRegistrationLogic()
        for kwargs, message in (
            ({"fixed": None, "moving": pair.moving}, "no fixed volume"),
            ({"fixed": pair.fixed, "moving": pair.fixed}, "both fixed and moving"),
            ({"fixed": pair.fixed, "moving": pair.moving, "fixed_segmentation": pair.fixed_segmentation}, "only the fixed segmentation"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                logic.register(device="cpu", scene=slicer.mrmlScene, **kwargs)
        self.assertEqual(self.nodeIDs(), before)

    def test_cancel_leaves_scene_as_it_was(self):
        pair = self.samplePair()
        before = self.nodeIDs()
        with self.assertRaises(Cancelled):
            AdversarialRegistrationLogic().register(
                pair.fixed, pair.moving, device="cpu", fixed_segmentation=pair.fixed_segmentation,
                moving_segmentation=pair.moving_segmentation, finetune_steps=3, cancel=lambda: True,
            )
        self.assertEqual(self.nodeIDs(), before)

    def test_train_on_a_folder_cancel_resume_and_register(self):
        """A user's folder of MR-US pairs: training cancels into a checkpoint, resumes, and the model registers."""
        import tempfile

        from priorreg.data import mrus_pairs

        pair = self.samplePair()
        with tempfile.TemporaryDirectory() as tmp:
            for source in mrus_pairs()[:3]:
                folder = Path(tmp, "pairs", source.id)
                folder.mkdir(parents=True)
                for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
                    Path(folder, f"{role}.nii.gz").write_bytes(getattr(source, role).read_bytes())
            logic, out, seen = AdversarialRegistrationLogic(), Path(tmp, "my_model"), []
            with self.assertRaisesRegex(Cancelled, "resumes it"):
                logic.train(Path(tmp, "pairs"), out, iterations=3, device="cpu", progress=lambda row, total: seen.append(row),
                            cancel=lambda: len(seen) >= 1)  # fmt: skip
            self.assertFalse(Path(out, "my_model.safetensors").exists())
            model = logic.train(Path(tmp, "pairs"), out, iterations=3, device="cpu")
            self.assertTrue(model.exists())
            before = len(self.nodeIDs())
            outputs = logic.register(pair.fixed, pair.moving, model=str(model), device="cpu")
            self.assertTrue(outputs.transform.IsA("vtkMRMLGridTransformNode"))
            self.assertGreater(len(self.nodeIDs()), before)
