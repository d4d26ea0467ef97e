"""The panel's Review section, driven headless like the rest of the panel (see test_slicer_widget):
Segment with the real engine, then click a row, tick "reviewed", edit a segment, Finish review, and
save a screenshot of the section (``UNETSEG_SCREENSHOT_DIR`` also keeps it, e.g. for docs/)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6", reason="PySide6 is needed for the headless panel tests")
from PySide6 import QtTest  # noqa: E402

import qtHarness  # noqa: E402

pytestmark = pytest.mark.widget
app = qtHarness.install()

import slicer  # noqa: E402
from test_slicer_review import addSliceViews, mask  # noqa: E402
from test_slicer_widget import newPanel, pump, selectModel  # noqa: E402

from SlicerUNetSegLib import review  # noqa: E402
from SlicerUNetSegLib.geometry import loadVolumeFile  # noqa: E402
from SlicerUNetSegLib.testing import TINY_LABELS, TINY_MODEL_ID  # noqa: E402


@pytest.fixture
def panel(scene, logic, modelsDir, tmp_path):
    import SlicerUNetSeg

    widget = newPanel(SlicerUNetSeg)
    widget.logic.shutdown()
    widget.logic = logic  # the session's warm worker
    widget.errors, widget.savePaths = [], []
    widget.confirm = lambda text: True
    widget.showError = lambda text, details=None: widget.errors.append(text)
    widget.askSavePath = lambda suggested: widget.savePaths.append(suggested) or str(tmp_path / "r.csv")
    widget.parent.resize(460, 1000)
    widget.parent.show()
    yield widget
    widget.timer.stop()
    widget.removeObservers()
    widget.parent.close()


def test_review_table_drives_jump_reviewed_and_finish(panel, scene, openkbp, tmp_path):
    ct = loadVolumeFile(openkbp[0], "pt_201 CT")
    views = addSliceViews(scene)
    selectModel(panel, TINY_MODEL_ID)
    panel.ui.deviceComboBox.setCurrentIndex(2)  # CPU
    section = panel.review
    assert not section.finishButton.isEnabled()  # nothing to review yet
    panel.ui.segmentButton.click()
    assert not section.finishButton.isEnabled()  # not while running
    pump(lambda: not panel.logic.isRunning())
    assert not panel.errors, panel.errors
    segmentation = panel._parameterNode.outputSegmentation
    table = section.table
    rows = panel.logic.reviewRows(segmentation)
    assert table.property("rowCount") == len(TINY_LABELS) == len(rows)
    for r, row in enumerate(rows):
        assert table.item(r, 0).text() == row["name"] == TINY_LABELS[r]["name"]
        assert table.item(r, 1).text() == f"{row['volumeMl']:.1f}"
        assert table.item(r, 2).text() == ("" if row["confidence"] is None else f"{row['confidence']:.2f}")
        assert table.item(r, 3).text() == ", ".join(f["code"] for f in row["flags"])
        assert table.item(r, 4).checkState() == qtHarness.QtCore.Qt.Unchecked
    assert section.finishButton.isEnabled()
    assert section.uncertaintyButton.isEnabled() == (panel.logic.uncertaintyVolume(segmentation) is not None)

    # a click on a row (a real mouse click on the cell) moves the slice views to that segment
    target = next(r for r, row in enumerate(rows) if row["volumeMl"])
    table.scrollToItem(table.item(target, 0))
    app.processEvents()
    cell = table.visualItemRect(table.item(target, 0)).center()
    QtTest.QTest.mouseClick(table.viewport(), qtHarness.QtCore.Qt.LeftButton,
                                      qtHarness.QtCore.Qt.NoModifier, cell)
    app.processEvents()
    point = panel.logic.focusPoint(segmentation, rows[target]["segmentId"])
    red = views["Axial"][0].GetSliceToRAS()
    assert [red.GetElement(r, 3) for r in range(3)] == pytest.approx(point, abs=1e-3)
    assert views["Axial"][0].GetSliceOffset() == pytest.approx(point[2], abs=1e-3)

    # ticking "reviewed" tags the segment
    table.item(target, 4).setCheckState(qtHarness.QtCore.Qt.Checked)
    segment = segmentation.GetSegmentation().GetSegment(rows[target]["segmentId"])
    assert review._tag(segment, review.REVIEWED_TAG) == "1"

    if section.uncertaintyButton.isEnabled():
        section.uncertaintyButton.click()
        node = panel.logic.uncertaintyVolume(segmentation)
        assert all(c.GetForegroundVolumeID() == node.GetID() for _, c in views.values())
        section.uncertaintyButton.click()
        assert all(c.GetForegroundVolumeID() is None for _, c in views.values())

    # erase a slab of the clicked segment, then Finish review
    before = mask(segmentation, rows[target]["segmentId"], ct)
    after = before.copy()
    after[: before.shape[0] // 2] = False
    slicer.util.updateSegmentBinaryLabelmapFromArray(after.astype(np.uint8), segmentation,
                                                     rows[target]["segmentId"], ct)
    section.finishButton.click()
    assert not panel.errors, panel.errors
    assert panel.savePaths and panel.savePaths[0].endswith(f"{segmentation.GetName()} review.csv")
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as f:
        written = {r["segment"]: r for r in csv.DictReader(f)}
    expected = 2 * (before & after).sum() / (before.sum() + after.sum())
    assert float(written[rows[target]["name"]]["dice"]) == pytest.approx(expected, abs=1e-4)
    assert written[rows[target]["name"]]["reviewed"] == "yes"
    assert "1 of 3 segments edited" in section.summaryLabel.text
    assert f"{rows[target]['name']}: Dice {expected:.3f}" in panel.ui.logTextEdit.plainText
    assert review._tag(segment, review.ALGORITHM_TYPE_TAG) == "SEMIAUTOMATIC"

    # the picture for the README: the Review section as the user sees it after a review
    table.selectRow(target)
    app.processEvents()
    picture = tmp_path / "review-panel.png"
    assert section.collapsible.grab().save(str(picture))
    image = qtHarness.QtGui.QImage(str(picture))
    assert image.width() > 300 and image.height() > 150
    folder = os.environ.get("UNETSEG_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, Path(folder) / "review-panel.png")


def test_a_segmentation_not_made_here_shows_nothing_to_review(panel, scene):
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual")
    manual.GetSegmentation().AddEmptySegment("", "Tumour", [1, 0, 0])
    panel.ui.outputSegmentationSelector.setCurrentNode(manual)
    app.processEvents()
    assert panel.review.table.property("rowCount") == 0
    assert "nothing to review" in panel.review.summaryLabel.text
    assert not panel.review.finishButton.isEnabled()
