"""The panel, driven headless: Slicer's own ScriptedLoadableModuleWidget and parameterNodeWrapper
(GUI connectors included), offscreen Qt (PySide6) with PythonQt-style property access and stand-ins
only for the CTK/qMRML widgets, the real MRML scene, and the real engine in its worker process.

Widget properties are read as PythonQt exposes them in Slicer (``label.text``, ``spinBox.value``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("PySide6", reason="PySide6 is needed for the headless panel tests")
import qtHarness  # noqa: E402

pytestmark = pytest.mark.widget
app = qtHarness.install()

import slicer  # noqa: E402

from SlicerUNetSegLib.geometry import loadVolumeFile  # noqa: E402
from SlicerUNetSegLib.testing import TINY_MODEL_ID, makeTinyModel  # noqa: E402

TWO_CHANNEL_ID = "tiny-two-channel"


@pytest.fixture(scope="module")
def twoChannelModel(modelsDir):
    """A second real package: two inputs (T1, FLAIR) and another default window."""
    package = makeTinyModel(modelsDir, modelId=TWO_CHANNEL_ID, inputs=("T1", "FLAIR"))
    meta = json.loads((package / "metadata.json").read_text())
    meta["title"], meta["licence"] = "Two-channel test model", "CC-BY-4.0"
    meta["preprocessing"]["normalization"].update(level=-600.0, width=1500.0)
    (package / "metadata.json").write_text(json.dumps(meta))
    yield package
    shutil.rmtree(package, ignore_errors=True)


@pytest.fixture
def panel(scene, logic, twoChannelModel):
    import SlicerUNetSeg

    widget = newPanel(SlicerUNetSeg)
    widget.logic.shutdown()
    widget.logic = logic  # share the session's warm worker
    widget.asked, widget.errors = [], []
    widget.answer = True
    widget.confirm = lambda text: widget.asked.append(text) or widget.answer
    widget.showError = lambda text, details=None: widget.errors.append(text)
    widget.parent.resize(440, 900)
    widget.parent.show()
    yield widget
    widget.timer.stop()
    widget.removeObservers()
    widget.parent.close()


@pytest.fixture
def ct(scene, syntheticCtFile):
    return loadVolumeFile(syntheticCtFile, "Synthetic CT")


def newPanel(module):
    """As the application creates a module panel: a parent qMRMLWidget, then setup()."""
    parent = slicer.qMRMLWidget()
    parent.setLayout(__import__("qt").QVBoxLayout())
    parent.setMRMLScene(slicer.mrmlScene)
    widget = module.SlicerUNetSegWidget(parent)
    widget.setup()
    return widget


def pump(condition, timeout=120.0):
    start = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        assert time.perf_counter() - start < timeout, "timed out waiting for the panel"
    app.processEvents()


def selectModel(panel, modelId):
    index = [m["id"] for m in panel.models].index(modelId)
    panel.ui.modelComboBox.setCurrentIndex(index)
    app.processEvents()


def screenshot(panel, name):
    folder = os.environ.get("UNETSEG_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert panel.parent.grab().save(str(Path(folder) / name))


def test_selecting_a_model_fills_window_labels_and_channels(panel, scene):
    t1 = slicer.util.addVolumeFromArray(__import__("numpy").ones((4, 8, 8)), name="case T1 weighted")
    flair = slicer.util.addVolumeFromArray(__import__("numpy").ones((4, 8, 8)), name="case FLAIR")
    selectModel(panel, TINY_MODEL_ID)
    selectModel(panel, TWO_CHANNEL_ID)
    node = panel._parameterNode
    assert node.modelId == TWO_CHANNEL_ID
    assert (panel.ui.windowLevelSpinBox.value, panel.ui.windowWidthSpinBox.value) == (-600, 1500)
    info = panel.ui.modelInfoLabel.text
    for expected in ("Two-channel test model", "Brainstem", "Mandible", "CC-BY-4.0", "0.0.1", "run time"):
        assert expected in info
    assert panel.ui.inputVolume2Selector.isVisibleTo(panel.parent)
    assert not panel.ui.inputVolume3Selector.isVisibleTo(panel.parent)
    assert "(FLAIR)" in panel.ui.inputVolume2Label.text
    assert (node.inputVolume, node.inputVolume2) == (t1, flair)  # matched by name, not by order
    selectModel(panel, TINY_MODEL_ID)
    assert (panel.ui.windowLevelSpinBox.value, panel.ui.windowWidthSpinBox.value) == (40, 400)
    assert not panel.ui.inputVolume2Selector.isVisibleTo(panel.parent)
    assert not panel.ui.windowLevelSpinBox.isEnabled()  # the model's window until overridden
    panel.ui.overrideWindowCheckBox.setChecked(True)
    panel.ui.windowPresetComboBox.setCurrentIndex(2)
    panel.ui.windowPresetComboBox.activated.emit(2)  # what a user's choice emits
    assert (node.windowLevel, node.windowWidth) == (-600.0, 1500.0)  # "Lung"


def test_segment_creates_the_segmentation_then_cancel_leaves_scene(panel, ct, scene):
    selectModel(panel, TINY_MODEL_ID)
    panel.ui.deviceComboBox.setCurrentIndex(2)  # CPU
    panel.ui.runtimeComboBox.setCurrentIndex(3)  # ONNX Runtime
    assert panel._parameterNode.inputVolume is ct and panel._parameterNode.device == "cpu"
    assert panel._parameterNode.runtime == "onnxruntime"
    panel.ui.segmentButton.click()
    assert panel.ui.segmentButton.text == "Cancel"
    pump(lambda: not panel.logic.isRunning())
    assert not panel.errors, panel.errors
    segmentation = panel._parameterNode.outputSegmentation
    assert segmentation is not None and panel.ui.outputSegmentationSelector.currentNode() is segmentation
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert panel.ui.segmentButton.text == "Segment" and panel.ui.progressBar.value == 100
    # the log names the device and the runtime that ran (auto picks the fastest one installed)
    assert re.search(r"Done on cpu \((PyTorch|OpenVINO|ONNX Runtime)\)", panel.ui.logTextEdit.plainText)
    panel.ui.show3DButton.setChecked(True)
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    panel.ui.logCollapsibleButton.setCollapsed(False)
    app.processEvents()
    screenshot(panel, "SlicerUNetSeg-panel.png")

    panel.ui.outputSegmentationSelector.setCurrentNode(None)  # "Create new segmentation"
    count = scene.GetNumberOfNodes()
    panel.ui.segmentButton.click()
    panel.ui.segmentButton.click()  # now "Cancel"
    pump(lambda: not panel.logic.isRunning(), timeout=5)
    assert panel.logic.job.state == "cancelled"
    assert scene.GetNumberOfNodes() == count
    assert panel.ui.segmentButton.text == "Segment"
    assert "Cancelled" in panel.ui.logTextEdit.plainText


def test_existing_segments_are_replaced_only_after_asking(panel, ct, scene):
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual")
    existing.GetSegmentation().AddEmptySegment("", "Tumour", [1, 0, 0])
    selectModel(panel, TINY_MODEL_ID)
    panel.ui.outputSegmentationSelector.setCurrentNode(existing)
    panel.answer = False
    panel.ui.segmentButton.click()
    assert panel.asked and "already has 1 segments" in panel.asked[-1]
    assert not panel.logic.isRunning()
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "Tumour"
    panel.answer = True
    panel.ui.segmentButton.click()
    pump(lambda: not panel.logic.isRunning())
    assert existing.GetSegmentation().GetNthSegment(0).GetName() == "Brainstem"


def test_settings_round_trip_through_the_parameter_node(panel, ct, scene):
    import SlicerUNetSeg

    selectModel(panel, TINY_MODEL_ID)
    panel.ui.deviceComboBox.setCurrentIndex(1)
    panel.ui.runtimeComboBox.setCurrentIndex(2)
    panel.ui.overrideWindowCheckBox.setChecked(True)
    panel.ui.windowLevelSpinBox.setValue(55)
    node = panel._parameterNode
    assert (node.device, node.runtime, node.overrideWindow, node.windowLevel) == \
        ("cuda", "openvino", True, 55.0)
    node.windowWidth = 321.0  # parameter node -> GUI
    assert panel.ui.windowWidthSpinBox.value == 321
    panel.ui.windowWidthSpinBox.setValue(0)  # a zero-width window cannot be entered
    assert node.windowWidth == 1.0
    panel.ui.windowWidthSpinBox.setValue(321)
    second = newPanel(SlicerUNetSeg)  # a fresh panel on the same scene shows the same
    try:
        assert second.ui.deviceComboBox.currentIndex == 1
        assert second.ui.runtimeComboBox.currentIndex == 2
        assert second.ui.overrideWindowCheckBox.checked
        assert (second.ui.windowLevelSpinBox.value, second.ui.windowWidthSpinBox.value) == (55, 321)
        assert second.ui.inputVolumeSelector.currentNode() is ct
    finally:
        second.cleanup()


def test_a_models_window_outside_the_panels_range_is_clamped_and_the_panel_keeps_working(panel, scene):
    """Slicer's real WithinRange raises ValueError outside [-3000, 3000] / [1, 8000]. Raised between
    StartModify and EndModify, it left the parameter node unable to send Modified events: the panel
    froze. The model's window is shown clamped, with a note, and the panel still follows the node."""
    tiny = next(m for m in panel.models if m["id"] == TINY_MODEL_ID)
    panel.models.append(dict(tiny, id="wide-window", title="Wide window", default_window=[5000.0, 12000.0]))
    panel.onModelChanged(len(panel.models) - 1)
    node = panel._parameterNode
    assert node.modelId == "wide-window"
    assert (node.windowLevel, node.windowWidth) == (3000.0, 8000.0)
    assert (panel.ui.windowLevelSpinBox.value, panel.ui.windowWidthSpinBox.value) == (3000, 8000)
    assert "outside what the panel can show" in panel.ui.logTextEdit.plainText
    modified = []
    tag = node.parameterNode.AddObserver(__import__("vtk").vtkCommand.ModifiedEvent,
                                         lambda caller, event: modified.append(1))
    try:
        node.device = "cpu"
        assert modified, "the parameter node no longer sends Modified events"
        assert panel.ui.deviceComboBox.currentIndex == 2  # the panel follows it
    finally:
        node.parameterNode.RemoveObserver(tag)


def test_the_real_within_range_rejects_what_the_stand_in_accepted(panel):
    with pytest.raises(ValueError, match="within range"):
        panel._parameterNode.windowWidth = 0.0


def test_a_failed_install_is_shown_as_the_modules_message(panel, monkeypatch):
    import subprocess

    from SlicerUNetSegLib import dependencies

    monkeypatch.setattr(dependencies, "missingRequirements", lambda: ["monai>=1.4"])

    def pipInstall(requirements):
        raise subprocess.CalledProcessError(1, ["pip", "install"], output="no network")

    monkeypatch.setattr(slicer.util, "pip_install", pipInstall)
    panel.onSegmentButton()  # raised CalledProcessError into the console before
    assert panel.errors and "pip failed" in panel.errors[-1]
    assert not panel.logic.isRunning()


def test_run_on_a_server_keeps_url_and_token_in_settings_not_in_the_scene(server, ct, scene, tmp_path):
    """Run on: a server. Its own logic (switching the shared one would stop the session's worker)."""
    import harness
    import SlicerUNetSeg
    from SlicerUNetSegLib import panelText

    qt = __import__("qt")
    qt.QSettings.setDefaultFormat(qt.QSettings.IniFormat)
    qt.QSettings.setPath(qt.QSettings.IniFormat, qt.QSettings.UserScope, str(tmp_path / "settings"))
    panel = newPanel(SlicerUNetSeg)
    panel.errors = []
    panel.showError = lambda text, details=None: panel.errors.append(text)
    try:
        panel.ui.runOnComboBox.setCurrentIndex(1)
        app.processEvents()
        assert panel.ui.serverTokenLineEdit.isVisibleTo(panel.parent)
        assert panel.ui.serverTokenLineEdit.echoMode == qt.QLineEdit.Password
        assert "address" in panel.ui.deviceInfoLabel.text  # nothing to connect to yet
        panel.ui.serverUrlLineEdit.setText(server.url)
        panel.ui.serverTokenLineEdit.setText(harness.SERVER_TOKEN)
        panel.ui.serverTokenLineEdit.editingFinished.emit()
        assert panel.ui.deviceInfoLabel.text.startswith(f"Server {server.url}: PyTorch"), \
            panel.ui.deviceInfoLabel.text
        assert [m["id"] for m in panel.models] == [TINY_MODEL_ID]  # the server's models
        assert not panel.ui.deviceComboBox.isEnabled()  # the server chooses its device
        selectModel(panel, TINY_MODEL_ID)
        panel._parameterNode.inputVolume = ct
        panel.ui.segmentButton.click()
        assert panel.ui.segmentButton.text == "Cancel"
        pump(lambda: not panel.logic.isRunning())
        assert not panel.errors, panel.errors
        segmentation = panel._parameterNode.outputSegmentation
        assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
        log = panel.ui.logTextEdit.plainText
        assert f"on the server {server.url}" in log and "upload" in log and panel.ui.progressBar.value == 100
        settings = qt.QSettings()
        assert settings.value(panelText.SETTINGS_SERVER_TOKEN) == harness.SERVER_TOKEN
        assert settings.value(panelText.SETTINGS_RUN_ON) == "server"
        scene.SetURL(str(tmp_path / "scene.mrml"))
        assert scene.Commit()
        saved = (tmp_path / "scene.mrml").read_text()
        assert "SlicerUNetSeg" in saved and harness.SERVER_TOKEN not in saved and server.url not in saved
        again = newPanel(SlicerUNetSeg)  # the next Slicer session: the choice and the address are back
        assert again.runOn() == "server" and again.ui.serverUrlLineEdit.text == server.url
        again.removeObservers()
    finally:
        panel.timer.stop()
        panel.logic.shutdown()
        panel.removeObservers()
        panel.parent.close()
        # later panels must not find this test's "run on a server" in their settings
        qt.QSettings.setPath(qt.QSettings.IniFormat, qt.QSettings.UserScope, str(tmp_path / "empty"))
