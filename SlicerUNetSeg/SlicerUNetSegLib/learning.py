"""Learn from corrections, on the Slicer side: add reviewed cases to a training set, fine-tune, versions.

Scriptable without the panel, like ``process``::

    logic = slicer.util.getModuleLogic("SlicerUNetSeg")
    logic.addToTrainingSet(ctNode, segmentationNode, ["Brainstem", "Mandible"])   # reviewed segments
    result = logic.finetune("openkbp-hn-oar")          # blocks; or startFinetune(...) + pollFinetune()
    print(result["summary"]); logic.listModelVersions("openkbp-hn-oar")
    logic.restoreModelVersion("openkbp-hn-oar")         # back to the version before the last fine-tune

The fine-tune runs in a worker process of its own (``WorkerRunner``, the same process handling as
Segment: JSON-line events, cancel, and after a grace period the whole process tree killed), so Slicer
stays responsive and Segment keeps working with the current model meanwhile. What it does, the gate
and where versions are kept: ``unetseg_engine.finetune`` and ``unetseg_engine.modelversions``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer

from unetseg_engine.errors import CancelledError, UNetSegError

from .geometry import checkVolume, lpsGeometry
from .review import REVIEWED_TAG  # segment tag: "1" when the user has reviewed the segment

if TYPE_CHECKING:
    from unetseg_engine.modelpkg import ModelPackage

    from .workerRunner import InferenceRunner

TRAINING_SET_SETTING = "SlicerUNetSeg/TrainingSetFolder"  # a folder holding one training set per model
FINETUNE_CANCEL_GRACE_S = 20.0  # the worker stops between iterations; then its process tree is killed


def _settings():
    try:
        import qt

        return qt.QSettings()
    except (ImportError, AttributeError):
        return None


def exportSegments(segmentationNode, segmentIds: list[str], referenceVolume) -> np.ndarray:
    """The segments as one (k, j, i) array on the reference volume's grid, segment n as value n
    (Slicer's own merge: ``ExportSegmentsToLabelmapNode``, which also resamples a segmentation under
    another transform). The temporary labelmap node and its display and colour nodes are removed."""
    import vtk

    scene = referenceVolume.GetScene()
    ids = vtk.vtkStringArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SlicerUNetSeg_export__")
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, referenceVolume,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise UNetSegError("Slicer could not export the segments to a label map.")
        return slicer.util.arrayFromVolume(labelmap).astype(np.intp)
    finally:  # the export also made a display node and a colour table: remove all it added
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in existing and node.GetScene() is not None:
                scene.RemoveNode(node)


class FinetuneJob:
    """One fine-tune: progress, then ``result`` (the engine's FinetuneResult as JSON) or ``error``."""

    def __init__(self, modelId: str, dataset: str, output: str, onProgress, onDone) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.modelId, self.dataset, self.output = modelId, dataset, output
        self.onProgress, self.onDone = onProgress, onDone
        self.state = "running"  # running, cancelling, done, failed, cancelled
        self.stage, self.fraction = "starting", 0.0
        self.result: dict[str, Any] | None = None
        self.summary: str | None = None
        self.error: str | None = None
        self.errorDetails: str | None = None
        self.startTime = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def accepted(self) -> bool:
        return bool(self.result and self.result.get("accepted"))


class LearningLogicMixin:
    """The learn-from-corrections part of ``SlicerUNetSegLogic`` (needs ``self.finetuneRunner``)."""

    finetuneJob: FinetuneJob | None = None
    finetuneRunner: InferenceRunner  # set by SlicerUNetSegLogic.__init__

    if TYPE_CHECKING:  # SlicerUNetSegLogic's
        @staticmethod
        def getModel(modelId: str | None = None) -> ModelPackage: ...

    # ---- the training set -------------------------------------------------------------------------
    @staticmethod
    def trainingSetFolder(modelId: str) -> Path:
        """The model's training set: ``<setting>/<model id>``, by default in the engine's user data
        folder (``~/.local/share/unetseg/training-sets/<model id>``, beside the user models)."""
        from unetseg_engine.trainingset import default_training_set_dir

        settings = _settings()
        root = settings.value(TRAINING_SET_SETTING) if settings is not None else None
        return Path(str(root)) / modelId if root else default_training_set_dir(modelId)

    @staticmethod
    def setTrainingSetRoot(folder: str | None) -> None:
        """Keep training sets under ``folder`` (None: back to the default)."""
        settings = _settings()
        if settings is None:
            raise UNetSegError("Application settings are not available here.")
        if folder:
            settings.setValue(TRAINING_SET_SETTING, str(folder))
        else:
            settings.remove(TRAINING_SET_SETTING)

    @staticmethod
    def reviewedSegmentIds(segmentationNode) -> list[str]:
        """Segments tagged as reviewed (``REVIEWED_TAG`` = "1"), in segment order."""
        import vtk

        segmentation = segmentationNode.GetSegmentation()
        out = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            value = vtk.reference("")  # vtkSegment::GetTag(tag, std::string& value)
            if segmentation.GetSegment(segmentId).GetTag(REVIEWED_TAG, value) and str(value) == "1":
                out.append(segmentId)
        return out

    def addToTrainingSet(self, inputVolumes, segmentationNode, reviewedSegments=None,
                         modelId: str | None = None, folder: str | None = None,
                         caseId: str | None = None) -> dict[str, Any]:
        """Write the volume(s) and the reviewed segments as a new case of the model's training set.

        ``reviewedSegments``: segment IDs or names (default: the segments tagged as reviewed). Each
        must be named like one of the model's labels; its voxels get that label's value, on the first
        volume's grid. Unreviewed organs are left out of the label map and of the case's
        partial-label entry, so fine-tuning does not teach their zeros as background. Never
        overwrites: a new case id, or ``caseId`` if it is free (else UNetSegError, nothing written).
        The scene is only read. Returns the engine's record (case id, file paths, reviewed values).
        """
        import SimpleITK as sitk

        from unetseg_engine.imageio import image_from_array
        from unetseg_engine.trainingset import add_case

        if not isinstance(inputVolumes, (list, tuple)):
            inputVolumes = [inputVolumes]
        model = self.getModel(modelId)
        channels = [item["name"] for item in model.meta["inputs"]]
        if len(inputVolumes) != len(channels):
            raise UNetSegError(f"Model '{model.meta['title']}' takes {len(channels)} input volume(s) "
                               f"({', '.join(channels)}); select one volume for each.")
        for volume, channel in zip(inputVolumes, channels):
            checkVolume(volume, f"input volume '{channel}'")
        if segmentationNode is None:
            raise UNetSegError("Select the segmentation whose reviewed segments to add.")
        segmentation = segmentationNode.GetSegmentation()
        if reviewedSegments is None:
            reviewedSegments = self.reviewedSegmentIds(segmentationNode)
        values = {label["name"]: int(label["value"]) for label in model.labels}
        reference = inputVolumes[0]
        shape = slicer.util.arrayFromVolume(reference).shape
        labelArray = np.zeros(shape, np.uint8)
        segmentIds, reviewed = [], []
        for item in reviewedSegments:
            segmentId = item if segmentation.GetSegment(item) is not None else \
                segmentation.GetSegmentIdBySegmentName(item)
            segment = segmentation.GetSegment(segmentId) if segmentId else None
            if segment is None:
                raise UNetSegError(f"'{segmentationNode.GetName()}' has no segment '{item}'.")
            if segment.GetName() not in values:
                raise UNetSegError(f"Segment '{segment.GetName()}' is not one of the labels of "
                                   f"'{model.id}' ({', '.join(values)}); rename it to its label, or "
                                   "leave it out.")
            segmentIds.append(segmentId)
            reviewed.append(values[segment.GetName()])
        if segmentIds:
            exported = exportSegments(segmentationNode, segmentIds, reference)  # values 1..n, in order
            if exported.shape != shape:
                raise UNetSegError(f"The segments came back with shape {exported.shape}, not the "
                                   f"volume's {shape}; please report this.")
            lut = np.array([0] + reviewed, np.uint8)
            labelArray = lut[exported]
        spacing, origin, direction = lpsGeometry(reference)
        images = [image_from_array(slicer.util.arrayFromVolume(volume), *lpsGeometry(volume))
                  for volume in inputVolumes]
        label = image_from_array(labelArray, spacing, origin, direction)
        label = sitk.Cast(label, sitk.sitkUInt8)
        root = Path(folder) if folder else self.trainingSetFolder(model.id)
        return add_case(root, images, label, model.labels, reviewed, channels, case_id=caseId,
                        name=f"Corrected cases for {model.id}")

    # ---- versions ---------------------------------------------------------------------------------
    @staticmethod
    def listModelVersions(modelId: str) -> list[dict[str, Any]]:
        """Oldest first: the base version, then each installed fine-tune, with ``active``."""
        from unetseg_engine.modelpkg import base_package
        from unetseg_engine.modelversions import list_versions

        base = base_package(modelId)
        return list_versions(modelId, base.meta["version"] if base else None)

    @staticmethod
    def restoreModelVersion(modelId: str, version: str | None = None) -> str:
        """Make an earlier version active (default: the one the active version came from)."""
        from unetseg_engine.modelpkg import base_package
        from unetseg_engine.modelversions import restore_version

        base = base_package(modelId)
        return restore_version(modelId, version, base.meta["version"] if base else None)

    # ---- fine-tuning --------------------------------------------------------------------------------
    def isFinetuning(self) -> bool:
        return self.finetuneJob is not None and not self.finetuneJob.finished

    def startFinetune(self, modelId: str | None = None, datasetFolder: str | None = None,
                      validationDataset: str | None = None, settings: dict[str, Any] | None = None,
                      onProgress: Callable[[str, float], None] | None = None,
                      onDone: Callable[[FinetuneJob], None] | None = None,
                      runFolder: str | None = None) -> FinetuneJob:
        """Start fine-tuning in the background; call ``pollFinetune`` often (a QTimer). ``settings``:
        the engine's FinetuneSettings fields (iterations, learning_rate, device, ...)."""
        from unetseg_engine.finetune import FinetuneSettings
        from unetseg_engine.modelpkg import user_models_dir

        if self.isFinetuning():
            raise UNetSegError("A fine-tune is already running; cancel it or wait for it to finish.")
        model = self.getModel(modelId)
        dataset = Path(datasetFolder) if datasetFolder else self.trainingSetFolder(model.id)
        if not (dataset / "dataset.json").is_file():
            raise UNetSegError(f"The training set {dataset} is empty: add reviewed cases first "
                               "('Add to training set').")
        try:  # refuse bad settings here, not in the worker
            FinetuneSettings(**(settings or {})).check()
        except TypeError as error:
            raise UNetSegError(f"Unknown fine-tuning setting ({error}); the settings are the fields of "
                               "unetseg_engine.finetune.FinetuneSettings.") from None
        output = Path(runFolder) if runFolder else user_models_dir().parent / "finetune-runs" / \
            f"{model.id}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        job = FinetuneJob(model.id, str(dataset), str(output), onProgress, onDone)
        self.finetuneRunner.start({"cmd": "finetune", "id": job.id, "model": model.id,
                                   "dataset": str(dataset), "output": str(output),
                                   "validation_dataset": validationDataset, "settings": settings or {}})
        self.finetuneJob = job
        return job

    def cancelFinetune(self) -> None:
        """Stop the fine-tune: nothing is installed; the current model stays."""
        job = self.finetuneJob
        if job is not None and not job.finished:
            job.state = "cancelling"
            self.finetuneRunner.cancel()

    def pollFinetune(self) -> bool:
        """Handle the fine-tune worker's events; True while it runs."""
        for event in self.finetuneRunner.poll():
            job = self.finetuneJob
            if job is None or str(event.get("id")) != job.id or job.finished:
                continue
            kind = event.get("event")
            if kind == "progress":
                job.stage, job.fraction = event["stage"], float(event["fraction"])
                if job.onProgress:
                    job.onProgress(job.stage, job.fraction)
            elif kind == "done":
                job.result, job.summary = event.get("result"), event.get("summary")
                self._endFinetune(job, "done")
            elif kind == "error":
                cancelled = event.get("kind") == "cancelled" or job.state == "cancelling"
                self._endFinetune(job, "cancelled" if cancelled else "failed",
                                  event.get("message", "Unknown error"),
                                  event.get("details") or event.get("traceback"))
        return self.isFinetuning()

    def _endFinetune(self, job: FinetuneJob, state: str, error: str | None = None, details=None) -> None:
        job.state, job.error, job.errorDetails = state, error, details
        if job.onDone:
            job.onDone(job)

    def finetune(self, modelId: str | None = None, datasetFolder: str | None = None,
                 validationDataset: str | None = None, settings: dict[str, Any] | None = None,
                 onProgress: Callable[[str, float], None] | None = None,
                 timeoutS: float | None = None, runFolder: str | None = None) -> dict[str, Any]:
        """Fine-tune and wait; returns the result (``accepted``, ``gate`` figures, versions, paths).
        Raises CancelledError when cancelled (or past ``timeoutS``), UNetSegError when it failed."""
        job = self.startFinetune(modelId, datasetFolder, validationDataset, settings, onProgress,
                                 runFolder=runFolder)
        app = getattr(slicer, "app", None)
        while self.pollFinetune():
            if timeoutS is not None and time.perf_counter() - job.startTime > timeoutS:
                self.cancelFinetune()
                timeoutS = None
            if app is not None:
                app.processEvents()
            time.sleep(0.05)
        if job.state == "cancelled":
            raise CancelledError(job.error or "Fine-tuning was cancelled.")
        if job.state == "failed":
            raise UNetSegError(job.error)
        return dict(job.result or {}, summary=job.summary)
