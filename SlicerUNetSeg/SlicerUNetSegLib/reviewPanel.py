"""The panel's Review section: shows what ``ReviewLogicMixin`` computes, and nothing more.

A table of the result's segments (volume, confidence, flags, a "reviewed" check box); clicking a row
jumps the slice views to that segment's least certain region; "Show uncertainty" overlays the engine's
map; "Finish review" writes the change report (a table node and a CSV) and tags edited segments.

Built in code rather than in the ``.ui`` file so that it stays one self-contained piece next to the
rest of the panel. Qt is used the way both PythonQt (Slicer) and PySide (the headless tests) accept:
methods for setting, ``widget.property(name)`` for reading a Qt property.
"""

from __future__ import annotations

import os

import slicer

COLUMNS = ("Segment", "Volume (ml)", "Confidence", "Flags", "Reviewed")
REVIEWED_COLUMN = COLUMNS.index("Reviewed")
ROW_HEIGHT = 30  # pixels, about a table row at Slicer's default font


def confidenceText(value) -> str:
    return "" if value is None else f"{float(value):.2f}"


def flagsText(flags) -> str:
    return ", ".join(flag.get("code", "?") for flag in flags) if flags else ""


class ReviewSection:
    """Owns the Review widgets of ``panel`` (a ``SlicerUNetSegWidget``) and forwards to its logic."""

    def __init__(self, panel) -> None:
        self.panel = panel
        self.segmentation = None
        self.rowIds: list[str] = []
        self._filling = False

    @property
    def logic(self):
        return self.panel.logic

    def setup(self, layout, before=None) -> None:
        import ctk
        import qt

        self.collapsible = ctk.ctkCollapsibleButton()
        self.collapsible.setObjectName("reviewCollapsibleButton")
        self.collapsible.text = "Review"
        box = qt.QVBoxLayout(self.collapsible)
        self.table = qt.QTableWidget()
        self.table.setObjectName("reviewTable")
        self.table.setColumnCount(len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.table.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        self.table.setToolTip("Click a segment to show its least certain region in the slice views")
        self.table.cellClicked.connect(lambda row, column: self.onRowClicked(row))
        self.table.itemChanged.connect(self.onItemChanged)
        box.addWidget(self.table)
        buttons = qt.QHBoxLayout()
        self.uncertaintyButton = qt.QPushButton("Show uncertainty")
        self.uncertaintyButton.setObjectName("showUncertaintyButton")
        self.uncertaintyButton.setCheckable(True)
        self.uncertaintyButton.setToolTip("Overlay the model's uncertainty map on the slice views")
        self.uncertaintyButton.toggled.connect(lambda checked: self.onShowUncertainty(checked))
        self.finishButton = qt.QPushButton("Finish review")
        self.finishButton.setObjectName("finishReviewButton")
        self.finishButton.setToolTip("Compare the segments with what the AI drew (Dice, HD95, surface "
                                     "Dice, added path length, added/removed volume), save the report "
                                     "and mark edited segments as semi-automatic")
        self.finishButton.clicked.connect(lambda *args: self.onFinishReview())
        buttons.addWidget(self.uncertaintyButton)
        buttons.addWidget(self.finishButton)
        box.addLayout(buttons)
        self.summaryLabel = qt.QLabel("Segment a volume to review the result.")
        self.summaryLabel.setObjectName("reviewSummaryLabel")
        self.summaryLabel.setWordWrap(True)
        box.addWidget(self.summaryLabel)
        index = layout.indexOf(before) if before is not None else -1
        layout.insertWidget(index if index >= 0 else layout.count(), self.collapsible)
        self.updateButtons()

    # ---- showing ----------------------------------------------------------------------------------
    def setSegmentation(self, segmentationNode) -> None:
        """Show ``segmentationNode``'s review (None, or a segmentation this module did not make:
        an empty table)."""
        if segmentationNode is not self.segmentation:
            self.segmentation = segmentationNode
            self.refresh()

    def refresh(self) -> None:
        import qt

        node = self.segmentation
        reviewable = node is not None and self.logic.originalSegmentation(node) is not None
        rows = self.logic.reviewRows(node) if reviewable else []
        self._filling = True
        try:
            self.table.setRowCount(len(rows))
            self.table.setMinimumHeight(ROW_HEIGHT * (min(len(rows), 10) + 1) + 6)  # no scrolling for ~10
            self.rowIds = [row["segmentId"] for row in rows]
            for r, row in enumerate(rows):
                volume = "" if row["volumeMl"] is None else f"{row['volumeMl']:.1f}"
                cells = (row["name"], volume, confidenceText(row["confidence"]), flagsText(row["flags"]))
                for c, text in enumerate(cells):
                    item = qt.QTableWidgetItem(text)
                    if row["flags"]:
                        item.setToolTip("\n".join(flag.get("message", "") for flag in row["flags"]))
                    self.table.setItem(r, c, item)
                check = qt.QTableWidgetItem("")
                check.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable | qt.Qt.ItemIsUserCheckable)
                check.setCheckState(qt.Qt.Checked if row["reviewed"] else qt.Qt.Unchecked)
                self.table.setItem(r, REVIEWED_COLUMN, check)
        finally:
            self._filling = False
        if node is None:
            self.summaryLabel.setText("Segment a volume to review the result.")
        elif not reviewable:
            self.summaryLabel.setText(f"'{node.GetName()}' was not made by Segment here: nothing to review.")
        else:
            flagged = sum(1 for row in rows if row["flags"])
            reviewed = sum(1 for row in rows if row["reviewed"])
            self.summaryLabel.setText(f"{len(rows)} segments, {flagged} flagged, {reviewed} reviewed.")
        blocked = self.uncertaintyButton.blockSignals(True)
        self.uncertaintyButton.setChecked(False)
        self.uncertaintyButton.blockSignals(blocked)
        self.updateButtons()

    def updateButtons(self) -> None:
        node = self.segmentation
        running = self.logic.isRunning() if self.logic else False
        reviewable = node is not None and self.logic.originalSegmentation(node) is not None
        self.finishButton.setEnabled(reviewable and not running)
        self.uncertaintyButton.setEnabled(reviewable and not running
                                          and self.logic.uncertaintyVolume(node) is not None)

    # ---- user actions -----------------------------------------------------------------------------
    def onRowClicked(self, row: int) -> None:
        if self.segmentation is None or not 0 <= row < len(self.rowIds):
            return
        point = self.logic.jumpToSegment(self.segmentation, self.rowIds[row])
        if point is None:
            self.panel.log(f"'{self.table.item(row, 0).text()}' is empty: nothing to show.")

    def onItemChanged(self, item) -> None:
        import qt

        if self._filling or item.column() != REVIEWED_COLUMN or self.segmentation is None:
            return
        self.logic.setSegmentReviewed(self.segmentation, self.rowIds[item.row()],
                                      item.checkState() == qt.Qt.Checked)

    def onShowUncertainty(self, show: bool) -> None:
        if self.segmentation is not None:
            self.logic.showUncertainty(self.segmentation, show)

    def onFinishReview(self) -> None:
        from unetseg_engine.errors import UNetSegError

        node = self.segmentation
        if node is None:
            return
        folder = getattr(getattr(slicer, "app", None), "defaultScenePath", "") or ""
        path = self.panel.askSavePath(os.path.join(folder, f"{node.GetName()} review.csv"))
        if not path:
            return
        try:
            # the save dialog has asked before replacing a file
            rows, table = self.logic.finishReview(node, path, overwrite=True)
        except UNetSegError as error:
            self.panel.showError(str(error))
            return
        edited = [row for row in rows if row["edited"]]
        self.panel.log(f"Review of '{node.GetName()}': {len(edited)} of {len(rows)} segments edited; "
                       f"report in the table '{table.GetName()}' and {path}")
        for row in edited:
            self.panel.log(f"  {row['segment']}: Dice {row['dice']:.3f}, surface Dice "
                           f"{row['surface_dice']:.3f}, added path {row['apl_mm']:.0f} mm, "
                           f"+{row['added_ml']:.2f} / -{row['removed_ml']:.2f} ml")
        self.summaryLabel.setText(f"Review finished: {len(edited)} of {len(rows)} segments edited "
                                  f"(marked semi-automatic). Report: {os.path.basename(path)}")
