"""SlicerUNetSeg: U-Net segmentation of CT and MR scans into editable segments.

The panel (``Resources/UI/SlicerUNetSeg.ui``) is bound to a parameter node, so its settings are saved
with the scene. The work is done by ``SlicerUNetSegLogic`` (in ``SlicerUNetSegLib/logic.py``), which
runs the Slicer-free engine (``unetseg_engine``) in a separate worker process: Slicer stays responsive,
a crash or out-of-memory in inference cannot take Slicer down, and the model stays loaded between runs.
"""

from __future__ import annotations

from typing import Any

import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SlicerUNetSegLib import dependencies, panelText
from SlicerUNetSegLib.learningPanel import LearningPanel
from SlicerUNetSegLib.logic import SlicerUNetSegLogic  # noqa: F401  (Slicer looks it up here)
from SlicerUNetSegLib.parameters import (  # noqa: F401
    INPUT_PARAMETERS,
    SlicerUNetSegParameterNode,
    clampWindow,
)
from SlicerUNetSegLib.reviewPanel import ReviewSection
from unetseg_engine.errors import UNetSegError


class SlicerUNetSeg(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        # As Slicer's module template does: _() marks text for translation, and the category is
        # translated in Slicer's own context so that it merges with the translated "Segmentation".
        self.parent.title = _("UNet Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerUNetSeg contributors"]
        self.parent.helpText = _(
            "Segment organs on CT or MR scans with U-Net models. Choose the input volume and a model, "
            "press Segment; the result is a segmentation ready for Segment Editor. The intensity window "
            "only affects preprocessing. See https://github.com/slicerunetseg/SlicerUNetSeg.")
        self.parent.acknowledgementText = _(
            "Built on MONAI and PyTorch. The default model was trained on OpenKBP (Babier et al., Med. "
            "Phys. 2021) with images from The Cancer Imaging Archive.")


def uiVariables(rootWidget):
    """Named child widgets as attributes (like slicer.util.childWidgetVariables, but reading the name
    through QObject.property so it works with PythonQt and with PySide in the headless tests)."""
    ui = type("SlicerUNetSegUi", (), {})()
    pending = list(rootWidget.children())
    while pending:
        child = pending.pop()
        pending.extend(child.children())
        name = child.property("objectName")
        if name:
            setattr(ui, name, child)
    return ui


def prop(widget, name):
    """A Qt property's value (PythonQt shadows getters such as text() with the property)."""
    return widget.property(name)


class SlicerUNetSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    logic: SlicerUNetSegLogic  # from ``setup`` on (Slicer calls it right after ``__init__``)

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        # a SlicerUNetSegParameterNode or None; Any because slicer's parameterNodeWrapper (untyped) adds
        # the wrapper's constructor and connectGui/parameterNode, which mypy cannot see on the class
        self._parameterNode: Any = None
        self._parameterNodeGuiTag = None
        self.models: list[dict] = []
        # Dialogs go through these, so tests and scripts can answer them.
        self.confirm = lambda text: slicer.util.confirmYesNoDisplay(text)
        # no detailedText key without details: PythonQt would show the text "None" in a details pane
        self.showError = lambda text, details=None: slicer.util.errorDisplay(
            text, **({"detailedText": details} if details else {}))
        self.askSavePath = self._askSavePath
        self.review: ReviewSection | None = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerUNetSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.uiWidget = uiWidget
        self.ui = uiVariables(uiWidget)
        self.inputSelectors = [getattr(self.ui, f"{name}Selector") for name in INPUT_PARAMETERS]
        self.inputLabels = [getattr(self.ui, f"{name}Label") for name in INPUT_PARAMETERS]
        for selector in self.inputSelectors + [self.ui.outputSegmentationSelector]:
            selector.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerUNetSegLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(self.onTimer)

        self.ui.windowPresetComboBox.addItem("Model default", None)
        for name, level, width in panelText.WINDOW_PRESETS:
            self.ui.windowPresetComboBox.addItem(f"{name} ({level:g} / {width:g})", [level, width])
        for text, value in panelText.DEVICE_CHOICES:
            self.ui.deviceComboBox.addItem(text, value)
        for text, value in panelText.RUNTIME_CHOICES:
            self.ui.runtimeComboBox.addItem(text, value)
        for text, value in panelText.RUN_ON_CHOICES:
            self.ui.runOnComboBox.addItem(text, value)
        # where to run, and the server's address and token: Slicer's settings, never the scene
        self.settings = qt.QSettings()
        self.ui.serverUrlLineEdit.setText(str(self.settings.value(panelText.SETTINGS_SERVER_URL, "") or ""))
        self.ui.serverTokenLineEdit.setText(str(self.settings.value(panelText.SETTINGS_SERVER_TOKEN, "")
                                                or ""))
        runOn = [v for _, v in panelText.RUN_ON_CHOICES]
        saved = self.settings.value(panelText.SETTINGS_RUN_ON, "local")
        self.ui.runOnComboBox.setCurrentIndex(runOn.index(saved) if saved in runOn else 0)

        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.runtimeComboBox.currentIndexChanged.connect(self.onRuntimeChanged)
        self.ui.runOnComboBox.currentIndexChanged.connect(lambda *args: self.onRunOnChanged())
        self.ui.serverUrlLineEdit.editingFinished.connect(lambda *args: self.onServerSettingsChanged())
        self.ui.serverTokenLineEdit.editingFinished.connect(lambda *args: self.onServerSettingsChanged())
        self.ui.windowPresetComboBox.activated.connect(self.onWindowPreset)
        self.ui.importModelButton.clicked.connect(lambda *args: self.onImportModel())
        self.ui.applyDisplayWindowButton.clicked.connect(lambda *args: self.onApplyDisplayWindow())
        self.ui.segmentButton.clicked.connect(lambda *args: self.onSegmentButton())
        self.ui.show3DButton.toggled.connect(lambda checked: self.onShow3D(checked))
        self.ui.overrideWindowCheckBox.toggled.connect(lambda *args: self.updateGui())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.setupReview()
        self.refreshModels()
        self.initializeParameterNode()
        torchVersion, cudaVersion = dependencies.torchStatus()
        self.ui.deviceInfoLabel.setText(panelText.environmentText(torchVersion, cudaVersion, None))
        self.learningPanel = LearningPanel(self)  # "Learn from corrections", a section of its own
        if self.runOn() == "server":  # connecting waits for the network: on Segment, not on start-up
            self.ui.deviceInfoLabel.setText("Runs on the server below; it is contacted when you press "
                                            "Segment or change its address or token.")

    # ---- parameter node ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        self.removeObservers()
        self.timer.stop()
        if getattr(self, "learningPanel", None):
            self.learningPanel.cleanup()
        if getattr(self, "logic", None):  # not there when setup failed
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if getattr(self.parent, "isEntered", True):
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        node = self.logic.getParameterNode()
        self.setParameterNode(node)
        if not node.inputVolume:
            node.inputVolume = next((v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                                     if not v.IsA("vtkMRMLLabelMapVolumeNode")), None)
        if not node.modelId and self.models:
            self.onModelChanged(0)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.updateGui)
        self._parameterNode = parameterNode
        if parameterNode:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()

    def currentModel(self) -> dict | None:
        modelId = self._parameterNode.modelId if self._parameterNode else None
        return next((m for m in self.models if m["id"] == modelId), None)

    def updateGui(self, caller=None, event=None) -> None:
        """Parameter node -> the parts of the panel that connectGui does not bind."""
        node = self._parameterNode
        if node is None:
            return
        model = self.currentModel()
        index = next((i for i, m in enumerate(self.models) if model and m["id"] == model["id"]), -1)
        if prop(self.ui.modelComboBox, "currentIndex") != index:
            blocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.setCurrentIndex(index)
            self.ui.modelComboBox.blockSignals(blocked)
        for combo, choices, value in ((self.ui.deviceComboBox, panelText.DEVICE_CHOICES, node.device),
                                      (self.ui.runtimeComboBox, panelText.RUNTIME_CHOICES, node.runtime)):
            values = [v for _, v in choices]
            wanted = values.index(value) if value in values else 0
            if prop(combo, "currentIndex") != wanted:
                blocked = combo.blockSignals(True)
                combo.setCurrentIndex(wanted)
                combo.blockSignals(blocked)
        self.ui.modelInfoLabel.setText(panelText.modelInfoHtml(model) if model else
                                       "No model installed: use 'Import model...'.")
        channels = model["inputs"] if model else ["Input"]
        for i, (label, selector) in enumerate(zip(self.inputLabels, self.inputSelectors)):
            label.setVisible(i < len(channels))
            selector.setVisible(i < len(channels))
            if i < len(channels):
                label.setText(f"Input volume ({channels[i]}):" if len(channels) > 1 else "Input volume:")
        defaultWindow = model["default_window"] if model else None
        hasWindow = bool(defaultWindow)
        override = hasWindow and node.overrideWindow
        if defaultWindow and not node.overrideWindow and (node.windowLevel, node.windowWidth) != \
                clampWindow(*defaultWindow):
            with slicer.util.NodeModify(node):  # shows the model's window
                node.windowLevel, node.windowWidth = clampWindow(*defaultWindow)
        self.ui.overrideWindowCheckBox.setEnabled(hasWindow)
        for widget in (self.ui.windowLevelSpinBox, self.ui.windowWidthSpinBox, self.ui.windowPresetComboBox):
            widget.setEnabled(override)
        self.ui.applyDisplayWindowButton.setEnabled(hasWindow and node.inputVolume is not None)
        running = self.logic.isRunning()
        inputsSet = all(v is not None for v in
                        [getattr(node, name) for name in INPUT_PARAMETERS[:len(channels)]])
        self.updateReview(node)
        self.ui.segmentButton.setEnabled(running or (model is not None and inputsSet))
        self.ui.segmentButton.setText("Cancel" if running else "Segment")
        self.ui.segmentButton.setToolTip("Stop the running segmentation" if running else
                                         "Segment the input volume(s) with the selected model")
        onServer = self.runOn() == "server"
        for widget in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.serverTokenLabel,
                       self.ui.serverTokenLineEdit):
            widget.setVisible(onServer)
        for widget in (self.ui.modelComboBox, self.ui.runOnComboBox, self.ui.serverUrlLineEdit,
                       self.ui.serverTokenLineEdit):
            widget.setEnabled(not running)
        for widget in (self.ui.importModelButton, self.ui.deviceComboBox, self.ui.runtimeComboBox):
            widget.setEnabled(not running and not onServer)  # the server chooses its device

    # ---- models, window, device -------------------------------------------------------------------
    def refreshModels(self, selectId: str | None = None) -> None:
        """The models of this computer, or those the server serves."""
        server = self.logic.server
        self.models = server.serverModels()["models"] if server else self.logic.listModels()
        blocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for model in self.models:
            self.ui.modelComboBox.addItem(f"{model['title']} ({model['id']})", model["id"])
        self.ui.modelComboBox.setCurrentIndex(-1)
        self.ui.modelComboBox.blockSignals(blocked)
        if selectId and self._parameterNode:
            self._parameterNode.modelId = selectId
        self.updateGui()

    def onModelChanged(self, index) -> None:
        if not self._parameterNode or index < 0 or index >= len(self.models):
            return
        model = self.models[index]
        node = self._parameterNode
        window = clampWindow(*model["default_window"]) if model["default_window"] else None
        if window is not None and window != tuple(float(v) for v in model["default_window"]):
            # the model's own window goes to preprocessing unchanged; only the panel shows it clamped
            self.log(f"Note: model '{model['id']}' has the window {model['default_window'][0]:g} / "
                     f"{model['default_window'][1]:g}, outside what the panel can show; it shows "
                     f"{window[0]:g} / {window[1]:g}.")
        # NodeModify ends the modification even when a setter raises: otherwise the parameter node
        # would stop sending Modified events and the panel would freeze
        with slicer.util.NodeModify(node):
            node.modelId = model["id"]
            if window is not None:
                node.overrideWindow = False
                node.windowLevel, node.windowWidth = window
            volumes = [(v.GetName(), v) for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not v.IsA("vtkMRMLLabelMapVolumeNode")]
            current = [getattr(node, name) for name in INPUT_PARAMETERS]
            for name, volume in zip(INPUT_PARAMETERS, panelText.matchVolumesToChannels(
                    model["inputs"], volumes, current)):
                setattr(node, name, volume)

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode and 0 <= index < len(panelText.DEVICE_CHOICES):
            self._parameterNode.device = panelText.DEVICE_CHOICES[index][1]

    def onRuntimeChanged(self, index) -> None:
        if self._parameterNode and 0 <= index < len(panelText.RUNTIME_CHOICES):
            self._parameterNode.runtime = panelText.RUNTIME_CHOICES[index][1]

    def onWindowPreset(self, index) -> None:
        node, model = self._parameterNode, self.currentModel()
        window = self.ui.windowPresetComboBox.itemData(index) or (model and model["default_window"])
        if node and window:
            node.windowLevel, node.windowWidth = window

    def onApplyDisplayWindow(self) -> None:
        node = self._parameterNode
        displayNode = node.inputVolume.GetDisplayNode() if node and node.inputVolume else None
        if displayNode is not None:
            displayNode.SetAutoWindowLevel(False)
            displayNode.SetWindowLevel(node.windowWidth, node.windowLevel)

    def onImportModel(self) -> None:
        import qt

        path = qt.QFileDialog.getOpenFileName(
            self.parent, "Import model package", "",
            "Model packages (*.zip);;nnU-Net trained-model folder (plans.json);;All files (*)")
        path = path[0] if isinstance(path, tuple) else path
        if path:
            self.importModel(path)

    def importModel(self, path: str, licence: str | None = None) -> None:
        from SlicerUNetSegLib.logic import nnunetFolder

        if nnunetFolder(path) is not None and not licence:  # nnU-Net folders carry no licence
            import qt

            licence = qt.QInputDialog.getText(self.parent, "Model licence",
                                              "Licence of this nnU-Net model, as its authors state it:")
            licence = (licence[0] if isinstance(licence, tuple) else licence) or None
            if not licence:
                self.showError("No licence given; nothing was imported.")
                return
        try:
            try:
                summary = self.logic.importModel(path, licence=licence)
            except UNetSegError as error:
                if "already installed" not in str(error) or not self.confirm(f"{error}\n\nReplace it?"):
                    raise
                summary = self.logic.importModel(path, overwrite=True, licence=licence)
        except UNetSegError as error:
            self.showError(str(error))
            return
        self.log(f"Imported model '{summary['title']}' ({summary['id']}) from {path}")
        self.refreshModels(selectId=summary["id"])

    # ---- this computer or a server ------------------------------------------------------------------
    def runOn(self) -> str:
        return self.ui.runOnComboBox.itemData(prop(self.ui.runOnComboBox, "currentIndex")) or "local"

    def onRunOnChanged(self) -> None:
        self.settings.setValue(panelText.SETTINGS_RUN_ON, self.runOn())
        self.connectRunner()

    def onServerSettingsChanged(self) -> None:
        for key, field in ((panelText.SETTINGS_SERVER_URL, self.ui.serverUrlLineEdit),
                           (panelText.SETTINGS_SERVER_TOKEN, self.ui.serverTokenLineEdit)):
            self.settings.setValue(key, prop(field, "text").strip())
        if self.runOn() == "server":
            self.connectRunner()

    def connectRunner(self) -> bool:
        """Point the logic at this computer or at the server in the fields; False (with the reason in
        the device line and the log) when the server cannot be used."""
        if self.logic.isRunning():
            return False
        if self.runOn() == "local":
            if self.logic.onServer:
                self.logic.useLocal()
                self.ui.deviceInfoLabel.setText(panelText.environmentText(*dependencies.torchStatus(), None))
            self.refreshModels(self._parameterNode.modelId if self._parameterNode else None)
            return True
        url = prop(self.ui.serverUrlLineEdit, "text").strip()
        token = prop(self.ui.serverTokenLineEdit, "text").strip()
        if not url or not token:
            self.ui.deviceInfoLabel.setText("Enter the server's address and its token.")
            self.updateGui()
            return False
        server = self.logic.server
        try:
            if server is None or server.url != url.rstrip("/") or server.token != token:
                server = self.logic.useServer(url, token)
            served = server.serverModels(refresh=True)
        except UNetSegError as error:
            self.ui.deviceInfoLabel.setText(f"Server not usable: {error}")
            self.log(f"Server not usable: {error}")
            self.updateGui()
            return False
        self.ui.deviceInfoLabel.setText(panelText.serverText(server.url, served["environment"]))
        self.refreshModels(self._parameterNode.modelId if self._parameterNode else None)
        return True

    # ---- segmenting -------------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onSegmentButton(self) -> None:
        if self.logic.isRunning():
            self.log("Cancelling...")
            self.ui.segmentButton.setText("Cancelling...")
            self.logic.cancel()
            return
        node, model = self._parameterNode, self.currentModel()
        if self.runOn() == "server":
            if not self.connectRunner():
                self.showError(prop(self.ui.deviceInfoLabel, "text"))
                return
            model = self.currentModel()
            if model is None:
                self.showError("Choose one of the models the server serves.")
                return
        if node is None or model is None:  # the button is disabled then
            return
        try:
            if self.runOn() == "local" and not dependencies.ensureDependencies(self.confirm, self.log):
                self.log("Segmentation needs the Python packages listed above; not installed.")
                return
        except dependencies.DependencyError as error:
            self.log(f"Failed: {error}")
            self.showError(str(error), getattr(error, "details", None))
            return
        output = node.outputSegmentation
        replace = False
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            count = output.GetSegmentation().GetNumberOfSegments()
            if not self.confirm(f"'{output.GetName()}' already has {count} segments. Replace them with "
                                "the new result?"):
                return
            replace = True
        window = [node.windowLevel, node.windowWidth] if node.overrideWindow else None
        try:
            if self.logic.environment is None and not self.logic.onServer:
                self.logic.requestEnvironment(self.onEnvironment)  # starts the worker
            self.logic.startSegmentation(
                [getattr(node, name) for name in INPUT_PARAMETERS[:len(model["inputs"])]], output,
                model["id"], node.device, window, replaceExisting=replace, onProgress=self.onProgress,
                onDone=self.onDone, runtime=node.runtime, uncertainty=True)
        except UNetSegError as error:
            self.showError(str(error))
            return
        server = self.logic.server
        where = f"the server {server.url}" if server else node.device
        self.log(f"Segmenting '{node.inputVolume.GetName()}' with '{model['title']}' on {where}"
                 + (f", window {window[0]:g}/{window[1]:g}" if window else ""))
        self.ui.progressBar.setValue(0)
        self.ui.stageLabel.setText("starting")
        self.timer.start()
        self.updateGui()

    def onTimer(self) -> None:
        self.logic.poll()
        if not self.logic.isRunning():
            self.timer.stop()

    def onEnvironment(self, hello: dict) -> None:
        self.ui.deviceInfoLabel.setText(panelText.environmentText(None, None, hello))

    def onProgress(self, stage: str, fraction: float) -> None:
        if stage != prop(self.ui.stageLabel, "text"):
            self.log(f"  {stage}")
        self.ui.stageLabel.setText(stage)
        self.ui.progressBar.setValue(int(round(100 * fraction)))

    def onDone(self, job) -> None:
        self.timer.stop()
        if job.state == "done":
            # the parameter node is released while the user is in another module (``exit``)
            (self._parameterNode or self.logic.getParameterNode()).outputSegmentation = \
                job.segmentationNode
            self.ui.progressBar.setValue(100)
            self.ui.stageLabel.setText("done")
            for message in job.messages:
                self.log(f"note: {message}")
            self.log(f"Done on {job.device} ({panelText.runtimeTitle(job.runtime)}). "
                     + panelText.timingSummary(job.timings, job.warm))
            self.onShow3D(self.ui.show3DButton.isChecked())
            if self.review is not None:  # the same node may hold a new result: show it afresh
                self.review.segmentation = None
            self.updateReview(self._parameterNode or self.logic.getParameterNode())
            self.learningPanel.refresh()  # the new segments, for marking as reviewed
        elif job.state == "cancelled":
            self.ui.stageLabel.setText("cancelled")
            self.log("Cancelled; the scene was left unchanged.")
        else:
            self.ui.stageLabel.setText("failed")
            self.log(f"Failed: {job.error}" + (f"\n{job.errorDetails}" if job.errorDetails else ""))
            self.showError(job.error, job.errorDetails)
        self.updateGui()

    def onShow3D(self, show: bool) -> None:
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentation is None:
            return
        if show:
            segmentation.CreateClosedSurfaceRepresentation()
        elif segmentation.GetDisplayNode():
            segmentation.GetDisplayNode().SetVisibility3D(False)
            return
        if segmentation.GetDisplayNode():
            segmentation.GetDisplayNode().SetVisibility3D(True)

    # ---- review (the table, the uncertainty overlay, Finish review: SlicerUNetSegLib.reviewPanel) --
    def setupReview(self) -> None:
        self.review = ReviewSection(self)
        self.review.setup(self.uiWidget.layout(), before=self.ui.logCollapsibleButton)

    def updateReview(self, node) -> None:
        if self.review is not None:
            self.review.setSegmentation(node.outputSegmentation if node else None)
            self.review.updateButtons()

    def _askSavePath(self, suggested: str) -> str:
        import qt

        path = qt.QFileDialog.getSaveFileName(self.parent, "Save the review report", suggested,
                                              "CSV files (*.csv)")
        return path[0] if isinstance(path, tuple) else path


class SlicerUNetSegTest(ScriptedLoadableModuleTest):
    """Runs the real path: a real scan (or a synthetic one without test data), the real engine in its
    worker on the CPU, a real small model (the default model when installed, else a tiny one built
    with random weights), and checks the segments, their geometry, and that the input is unchanged."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_SlicerUNetSeg_process()

    def test_SlicerUNetSeg_process(self) -> None:
        from SlicerUNetSegLib.testing import selfTestProcess

        selfTestProcess(self, SlicerUNetSegLogic)
