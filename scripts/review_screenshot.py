"""Regenerate docs/review-panel.png: the panel's Review section after a real review.

The shipped default model segments OpenKBP pt_201 in its worker (CPU), on the same headless panel the
widget tests use (Slicer's own Python code on slicer-core's MRML, PySide6 offscreen; see
Testing/slicer/harness.py). Two segments are ticked reviewed, the lower third of the brainstem is
erased as a reviewer might, and Finish review runs; then the section is grabbed.

    QT_QPA_PLATFORM=offscreen PYTHONPATH=SlicerUNetSeg python scripts/review_screenshot.py \\
        docs/review-panel.png
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "Testing" / "slicer"), str(REPO / "SlicerUNetSeg")]


def main(out: str) -> int:
    import harness
    import qtHarness

    app = qtHarness.install()
    harness.install()
    import numpy as np
    import slicer

    import SlicerUNetSeg
    from SlicerUNetSegLib.geometry import loadVolumeFile
    from SlicerUNetSegLib.testing import openkbpCase

    case = openkbpCase("pt_201")
    if case is None:
        print("OpenKBP pt_201 not found: set UNETSEG_DATA", file=sys.stderr)
        return 1
    scene = harness.newScene()
    ct = loadVolumeFile(case[0], "pt_201 CT")
    parent = slicer.qMRMLWidget()
    parent.setLayout(__import__("qt").QVBoxLayout())
    parent.setMRMLScene(scene)
    panel = SlicerUNetSeg.SlicerUNetSegWidget(parent)
    panel.setup()
    panel.confirm = lambda text: True
    report = Path(tempfile.mkdtemp()) / "review.csv"
    panel.askSavePath = lambda suggested: str(report)
    parent.resize(560, 1400)
    parent.show()
    try:
        node = panel._parameterNode
        node.inputVolume, node.device = ct, "cpu"
        panel.ui.segmentButton.click()
        while panel.logic.isRunning():
            app.processEvents()
            time.sleep(0.05)
        segmentation = node.outputSegmentation
        section = panel.review
        rows = panel.logic.reviewRows(segmentation)
        for r in (0, 2):
            section.table.item(r, 4).setCheckState(qtHarness.QtCore.Qt.Checked)
        brainstem = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Brainstem")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, brainstem, ct) > 0
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        mask[: slices[len(slices) // 3]] = False
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, brainstem, ct)
        section.finishButton.click()
        flagged = next((r for r, row in enumerate(rows) if row["flags"]), 0)
        section.table.selectRow(flagged)
        for _ in range(20):  # let each layout level settle (layout requests are posted level by level)
            app.processEvents()
            time.sleep(0.01)
        assert section.collapsible.grab().save(out)
        print(f"Wrote {out}; {panel.ui.logTextEdit.plainText.splitlines()[-1]}")
    finally:
        panel.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "docs" / "review-panel.png")))
