"""What every PriorReg module panel shares: the parameter node's life cycle, the frame a job runs in, the model choice.

Slicer's scripted-module template has each widget repeat the parameter-node plumbing (enter,
exit, scene close, `connectGui`), and every long job needs the same frame: PyTorch first
(installed after asking), the panel locked with Cancel shown, progress in the bar, Slicer's
event loop run at every report so that it stays responsive and Cancel can be clicked, and a
cancel or an error said in the panel, the traceback in the log. The three modules had three
copies of all of it; these mixins are the one. `slicer` and `qt` are imported inside the
methods, as everywhere in `priorreg.slicer`.

A module's widget is `class XWidget(JobPanel, ScriptedLoadableModuleWidget, VTKObservationMixin)`
(with `ModelChoice` first where the panel offers models). Its .ui has `applyButton`,
`cancelButton`, `progressBar`, `statusLabel` and `opacitySlider` (`ModelChoice`: `modelComboBox`,
`modelFileButton`, `modelSummaryLabel`; `Testing/packaging/test_panels.py` checks each .ui against
the mixins its widget uses). The widget's `setup` loads the .ui, connects its own widgets and ends
with `setupPanel(logic)`; it defines `onApplyButton` (usually `self.runJob(...)`) and
`lockedWhileRunning`, and overrides `readyToApply` when Apply needs more than a fixed and a
moving volume.
"""

from __future__ import annotations

import logging

from ..registration import Cancelled
from .dependencies import ensure_dependencies
from .logic import model_card, set_foreground_opacity

SCENE_UNCHANGED = "Cancelled; the scene is as it was."
ERROR_STYLE = "color: #c0392b"


class JobPanel:
    """The parameter node bound to the .ui, and jobs run one at a time with progress, Cancel and errors in the panel."""

    logic = None
    _parameterNode = None
    _parameterNodeGuiTag = None
    _running = False
    _cancelRequested = False

    def setupPanel(self, logic) -> None:
        """The end of the module's `setup`: observers, Apply, Cancel, the opacity slider, the parameter node."""
        import slicer

        self.logic = logic
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.opacitySlider.connect("valueChanged(double)", lambda value: set_foreground_opacity(slicer.mrmlScene, value))
        self.ui.cancelButton.visible = False
        self.initializeParameterNode()

    # ------------------------------------------------------------------------ parameter node
    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        import vtk

        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def readyToApply(self) -> tuple[bool, str]:
        """(whether Apply can run, why not or what it does, for its tooltip): a fixed and a moving volume by default."""
        p = self._parameterNode
        if p.fixedVolume is None or p.movingVolume is None:
            return False, "Select a fixed and a moving volume"
        return True, "Register the moving volume to the fixed volume"

    def updateGUI(self, caller=None, event=None) -> None:
        ready, tip = self.readyToApply() if self._parameterNode is not None else (False, "")
        self.ui.applyButton.enabled = ready and not self._running
        self.ui.applyButton.toolTip = tip

    # ---------------------------------------------------------------------------------- jobs
    def lockedWhileRunning(self) -> tuple:
        """The sections disabled while a job runs (the inputs, options, anything that would change the job)."""
        raise NotImplementedError

    def setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        self.ui.applyButton.visible = not running
        self.ui.cancelButton.visible = running
        for widget in self.lockedWhileRunning():
            widget.enabled = not running
        self.ui.progressBar.value = 0
        self.updateGUI()

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = ERROR_STYLE if error else ""

    def cancelRequested(self) -> bool:
        """The `cancel` callback a job passes to the backend, asked at every step."""
        return self._cancelRequested

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.setStatus("Cancelling...")

    def showProgress(self, step: int, total: int, text: str) -> None:
        """Bar and status; then Slicer's events, so that it stays responsive and Cancel can be clicked."""
        import slicer

        self.ui.progressBar.maximum = total
        self.ui.progressBar.value = step
        self.setStatus(text)
        slicer.app.processEvents()

    def onProgress(self, progress) -> None:
        """The backend's `Progress` reports: stage, step, loss where there is one, time left once it can be told."""
        loss = "" if progress.loss != progress.loss else f", loss {progress.loss:.4f}"  # NaN: no loss at this stage
        left = f", about {progress.remaining:.0f} s left" if progress.step > 1 and progress.total > 2 else ""
        self.showProgress(progress.step, progress.total, f"{progress.stage}: step {progress.step} of {progress.total}{loss}{left}")

    def runJob(self, what: str, job, cancelled: str | None = SCENE_UNCHANGED) -> None:
        """Run `job()` in the frame: PyTorch first, the panel locked, a cancel or an error said in the panel.

        `what` completes "could not ..." in messages; `cancelled`: the status after a cancel
        (None: the `Cancelled` message itself, e.g. where training resumes).
        """
        import slicer

        if self._running:
            return
        try:
            if not ensure_dependencies(slicer.util.confirmOkCancelDisplay):
                self.setStatus(f"PriorReg needs PyTorch to {what}; nothing was changed.", error=True)
                return
            self.setRunning(True)
            self.setStatus("Starting...")
            slicer.app.processEvents()
            job()
        except Cancelled as error:
            self.setStatus(cancelled or f"{error}.")
        except Exception as error:  # shown in the panel; the traceback goes to the log
            logging.exception(f"{type(self).__name__} could not {what}")
            self.setStatus(f"Error: {error}", error=True)
        finally:
            if self._running:
                self.setRunning(False)


class ModelChoice:
    """A combo box of the models found (shipped, $PRIORREG_MODELS) with each card's summary, and a file button.

    The widget sets `defaultModel` and defines `modelCards()` (`{name: card}` of the models it
    can use; `ImportError` while torch is missing) and `modelSummary(card)`. The parameter node
    has a `model` string.
    """

    defaultModel = ""

    def setupModelChoice(self) -> None:
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelFileButton.connect("clicked(bool)", self.onModelFileButton)
        self.populateModels()

    def modelCards(self) -> dict[str, dict]:
        raise NotImplementedError

    def modelSummary(self, card: dict) -> str:
        raise NotImplementedError

    def populateModels(self) -> None:
        """Refill the combo box (after PyTorch is installed, the cards can be read), keeping the current choice."""
        import qt

        combo = self.ui.modelComboBox
        current = combo.currentText or self.defaultModel
        combo.blockSignals(True)
        combo.clear()
        try:
            cards = self.modelCards()
        except ImportError:  # torch is not installed yet; Apply installs it
            combo.addItem(self.defaultModel)
            self.ui.modelSummaryLabel.text = "Model details appear once PyTorch is installed (Apply installs it)."
        else:
            for name, card in cards.items():
                combo.addItem(name)
                combo.setItemData(combo.count - 1, self.modelSummary(card), qt.Qt.ToolTipRole)
        if combo.findText(current) < 0:
            combo.addItem(current)
        combo.currentIndex = combo.findText(current)
        combo.blockSignals(False)
        self.onModelChanged()

    def onModelChanged(self, index=None) -> None:
        name = self.ui.modelComboBox.currentText
        if self._parameterNode and name:
            self._parameterNode.model = name
        try:
            summary = self.modelSummary(model_card(name))
        except ImportError:
            return  # torch missing: populateModels says so
        except (ValueError, OSError) as error:
            summary = str(error)
        self.ui.modelSummaryLabel.text = summary
        self.ui.modelComboBox.toolTip = summary

    def onModelFileButton(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(self.parent, "Model file", "", "Models (*.safetensors)")
        if path:
            self.addModel(path)

    def addModel(self, name: str) -> None:
        """Add a model (a file) to the choices and choose it."""
        self.ui.modelComboBox.addItem(name)
        self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.count - 1

    def setParameterNode(self, parameterNode) -> None:
        """As `JobPanel`'s, and the combo box shows the node's model."""
        super().setParameterNode(parameterNode)
        if self._parameterNode:
            index = self.ui.modelComboBox.findText(self._parameterNode.model)
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index
