"""The panel's "Learn from corrections" section: reviewed segments, Add to training set, Fine-tune
(becomes Cancel), the verdict with its figures, the model's versions and Restore previous version.

Built in code, in a collapsible section of its own at the bottom of the panel, so that it stays
separate from the ``.ui`` file and from the review table. Everything it does goes through the logic
(``learning.LearningLogicMixin``), which scripts can call directly.
"""

from __future__ import annotations

import html

import qt

from unetseg_engine.errors import UNetSegError

from .parameters import INPUT_PARAMETERS


def _prop(widget, name):
    return widget.property(name)


class LearningPanel:
    """Owns its widgets and its timer; ``widget`` is the module widget (logic, parameter node, log,
    confirm and showError come from it)."""

    def __init__(self, widget) -> None:
        import ctk

        self.widget = widget
        self.section = ctk.ctkCollapsibleButton()
        self.section.setObjectName("learnFromCorrectionsCollapsibleButton")
        self.section.text = "Learn from corrections"  # a property in CTK (a QAbstractButton)
        layout = qt.QFormLayout(self.section)

        self.reviewedList = qt.QListWidget()
        self.reviewedList.setObjectName("reviewedSegmentsList")
        self.reviewedList.setToolTip("Tick the segments you have reviewed (and corrected). Only those "
                                     "are added to the training set; the others count as not contoured.")
        self.reviewedList.setMaximumHeight(120)
        self.reviewedList.itemChanged.connect(self.onReviewedChanged)
        refreshButton = qt.QPushButton("Refresh")
        refreshButton.setObjectName("refreshReviewedButton")
        refreshButton.clicked.connect(lambda *args: self.refresh())
        layout.addRow("Reviewed segments:", self.reviewedList)
        layout.addRow("", refreshButton)

        self.addButton = qt.QPushButton("Add to training set")
        self.addButton.setObjectName("addToTrainingSetButton")
        self.addButton.setToolTip("Write the input volume and the reviewed segments as a new case of "
                                  "this model's training set (nnU-Net layout); nothing is overwritten.")
        self.addButton.clicked.connect(lambda *args: self.onAddToTrainingSet())
        self.trainingSetLabel = qt.QLabel()
        self.trainingSetLabel.setObjectName("trainingSetLabel")
        self.trainingSetLabel.setWordWrap(True)
        layout.addRow(self.addButton)
        layout.addRow("Training set:", self.trainingSetLabel)

        self.iterationsSpinBox = qt.QSpinBox()
        self.iterationsSpinBox.setObjectName("finetuneIterationsSpinBox")
        self.iterationsSpinBox.setRange(1, 100000)
        self.iterationsSpinBox.setValue(200)
        self.validationEdit = qt.QLineEdit()
        self.validationEdit.setObjectName("validationDatasetEdit")
        self.validationEdit.setPlaceholderText("only needed with fewer than 6 cases")
        self.validationEdit.setToolTip("A dataset folder holding the model's own validation cases; the "
                                       "fine-tuned model is judged on them when your training set has "
                                       "too few cases to hold some out.")
        layout.addRow("Iterations:", self.iterationsSpinBox)
        layout.addRow("Validation dataset:", self.validationEdit)
        self.finetuneButton = qt.QPushButton("Fine-tune")
        self.finetuneButton.setObjectName("finetuneButton")
        self.finetuneButton.clicked.connect(lambda *args: self.onFinetuneButton())
        self.progressBar = qt.QProgressBar()
        self.progressBar.setObjectName("finetuneProgressBar")
        self.stageLabel = qt.QLabel("")
        self.stageLabel.setObjectName("finetuneStageLabel")
        self.resultLabel = qt.QLabel("")
        self.resultLabel.setObjectName("finetuneResultLabel")
        self.resultLabel.setWordWrap(True)
        layout.addRow(self.finetuneButton)
        layout.addRow(self.progressBar)
        layout.addRow(self.stageLabel)
        layout.addRow(self.resultLabel)

        self.versionsLabel = qt.QLabel("")
        self.versionsLabel.setObjectName("modelVersionsLabel")
        self.versionsLabel.setWordWrap(True)
        self.restoreButton = qt.QPushButton("Restore previous version")
        self.restoreButton.setObjectName("restoreVersionButton")
        self.restoreButton.clicked.connect(lambda *args: self.onRestore())
        layout.addRow("Versions:", self.versionsLabel)
        layout.addRow(self.restoreButton)

        widget.layout.addWidget(self.section)
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.timeout.connect(self.onTimer)
        self.refresh()

    # ---- state -----------------------------------------------------------------------------------
    @property
    def logic(self):
        return self.widget.logic

    def modelId(self) -> str | None:
        node = self.widget._parameterNode
        return node.modelId if node else None

    def segmentation(self):
        node = self.widget._parameterNode
        return node.outputSegmentation if node else None

    def refresh(self) -> None:
        """Segments of the output segmentation, training-set size, versions, button states."""
        segmentation = self.segmentation()
        blocked = self.reviewedList.blockSignals(True)
        self.reviewedList.clear()
        if segmentation is not None:
            reviewed = set(self.logic.reviewedSegmentIds(segmentation))
            s = segmentation.GetSegmentation()
            for index in range(s.GetNumberOfSegments()):
                segmentId = s.GetNthSegmentID(index)
                item = qt.QListWidgetItem(s.GetSegment(segmentId).GetName())
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if segmentId in reviewed else qt.Qt.Unchecked)
                item.setData(qt.Qt.UserRole, segmentId)
                self.reviewedList.addItem(item)
        self.reviewedList.blockSignals(blocked)
        modelId = self.modelId()
        running = self.logic.isFinetuning()
        if modelId:
            folder = self.logic.trainingSetFolder(modelId)
            labels = folder / "labelsTr"
            cases = len(list(labels.glob("*.nii.gz"))) if labels.is_dir() else 0
            self.trainingSetLabel.setText(f"{cases} case(s) in {folder}")
            versions = self.logic.listModelVersions(modelId)
            self.versionsLabel.setText(", ".join(
                f"{v['version']} ({v['kind']}{', active' if v['active'] else ''})" for v in versions))
            canRestore = any(v["active"] and v["kind"] == "fine-tuned" for v in versions)
        else:
            self.trainingSetLabel.setText("Select a model.")
            self.versionsLabel.setText("")
            canRestore = False
        self.addButton.setEnabled(bool(modelId) and segmentation is not None and not running)
        self.finetuneButton.setEnabled(bool(modelId))
        self.finetuneButton.setText("Cancel fine-tune" if running else "Fine-tune")
        self.restoreButton.setEnabled(canRestore and not running)

    def onReviewedChanged(self, item) -> None:
        segmentation = self.segmentation()
        if segmentation is not None:
            self.logic.setSegmentReviewed(segmentation, item.data(qt.Qt.UserRole),
                                          item.checkState() == qt.Qt.Checked)

    # ---- actions ---------------------------------------------------------------------------------
    def onAddToTrainingSet(self) -> None:
        node = self.widget._parameterNode
        model = self.widget.currentModel()
        if node is None or model is None:
            return
        volumes = [getattr(node, name) for name in INPUT_PARAMETERS[:len(model["inputs"])]]
        try:
            record = self.logic.addToTrainingSet(volumes, node.outputSegmentation, modelId=model["id"])
        except UNetSegError as error:
            self.widget.showError(str(error))
            return
        self.widget.log(f"Added {record['case']} to the training set {record['dataset']} (reviewed label "
                        f"values {record['reviewed']}).")
        self.refresh()

    def onFinetuneButton(self) -> None:
        if self.logic.isFinetuning():
            self.widget.log("Cancelling the fine-tune...")
            self.logic.cancelFinetune()
            return
        modelId = self.modelId()
        validation = _prop(self.validationEdit, "text") or None
        settings = {"iterations": int(_prop(self.iterationsSpinBox, "value"))}
        if not self.widget.confirm(f"Fine-tune '{modelId}' for {settings['iterations']} iterations on "
                                   f"{self.logic.trainingSetFolder(modelId)}? It runs in the "
                                   "background; the new model is installed only if it is not worse "
                                   "on held-out cases."):
            return
        try:
            self.logic.startFinetune(modelId, validationDataset=validation, settings=settings,
                                     onProgress=self.onProgress, onDone=self.onDone)
        except UNetSegError as error:
            self.widget.showError(str(error))
            return
        self.widget.log(f"Fine-tuning '{modelId}'...")
        self.resultLabel.setText("")
        self.progressBar.setValue(0)
        self.timer.start()
        self.refresh()

    def onTimer(self) -> None:
        if not self.logic.pollFinetune():
            self.timer.stop()

    def onProgress(self, stage: str, fraction: float) -> None:
        if stage != _prop(self.stageLabel, "text"):
            self.widget.log(f"  {stage}")
        self.stageLabel.setText(stage)
        self.progressBar.setValue(int(round(100 * fraction)))

    def onDone(self, job) -> None:
        self.timer.stop()
        if job.state == "done":
            self.stageLabel.setText("accepted" if job.accepted else "rejected")
            self.resultLabel.setText(resultHtml(job.result))
            self.widget.log(job.summary or "")
            self.widget.refreshModels(selectId=job.modelId)  # the active version changed (or not)
        elif job.state == "cancelled":
            self.stageLabel.setText("cancelled")
            self.widget.log("Fine-tune cancelled; nothing was installed.")
        else:
            self.stageLabel.setText("failed")
            self.widget.log(f"Fine-tune failed: {job.error}")
            self.widget.showError(job.error, job.errorDetails)
        self.refresh()

    def onRestore(self) -> None:
        modelId = self.modelId()
        if not modelId or not self.widget.confirm(f"Go back to the previous version of '{modelId}'?"):
            return
        try:
            version = self.logic.restoreModelVersion(modelId)
        except UNetSegError as error:
            self.widget.showError(str(error))
            return
        self.widget.log(f"'{modelId}' is now at version {version}.")
        self.widget.refreshModels(selectId=modelId)
        self.refresh()

    def cleanup(self) -> None:
        self.timer.stop()


def resultHtml(result: dict | None) -> str:
    """The verdict and the per-organ Dice of both models on the held-out cases."""
    if not result:
        return ""
    gate = result["gate"]
    verdict = (f"<b>Accepted</b>: installed as version {html.escape(result['new_version'])}."
               if result["accepted"] else
               f"<b>Rejected</b>: version {html.escape(result['old_version'])} stays. "
               + html.escape(" ".join(gate["reasons"])))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['n']}</td><td>{v['old']:.3f}</td><td>{v['new']:.3f}</td>"
        f"<td>{v['delta']:+.3f}</td></tr>" for name, v in gate["per_label"].items() if v["n"])
    return (f"{verdict}<br>Held-out cases ({html.escape(gate['held_out'])}): {len(gate['cases'])}"
            "<table><tr><th>organ</th><th>n</th><th>current</th><th>fine-tuned</th><th>change</th></tr>"
            f"{rows}<tr><td><b>mean</b></td><td></td><td>{gate['old_mean_dice']:.3f}</td>"
            f"<td>{gate['new_mean_dice']:.3f}</td>"
            f"<td>{gate['new_mean_dice'] - gate['old_mean_dice']:+.3f}</td></tr></table>")

