"""SlicerUNetSegLogic: segment volume nodes with a model package, without the panel.

From the Python console or a script::

    logic = slicer.util.getModuleLogic("SlicerUNetSeg")
    segmentation = logic.process(volumeNode)                   # blocks; default model, auto device
    segmentation = logic.process([t1, flair], None, "my-mr-model", device="cpu", window=None)

The panel uses the non-blocking pair ``startSegmentation`` (progress and completion callbacks) and
``poll`` (called from a ``qt.QTimer``): inference runs in a separate worker process (see
``workerRunner``), and the scene is touched only on the main thread once the labels are back. Until
then nothing in the scene changes, so a cancel or an error leaves the scene as it was.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from unetseg_engine.checks import check_device
from unetseg_engine.errors import CancelledError, UNetSegError
from unetseg_engine.runtimes import RUNTIME_CHOICES as RUNTIMES

from .geometry import checkVolume, writeVolumeForWorker
from .parameters import SlicerUNetSegParameterNode
from .segmentationBuilder import fillSegmentation, placeLikeVolume
from .workerRunner import InferenceRunner, WorkerRunner

ProgressCallback = Callable[[str, float], None]


class SegmentationJob:
    """One Segment press: its inputs, progress, and outcome (``segmentationNode`` or ``error``)."""

    def __init__(self, inputVolumes, outputNode, model, window, onProgress, onDone) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.inputVolumes, self.outputNode, self.model, self.window = inputVolumes, outputNode, model, window
        self.onProgress, self.onDone = onProgress, onDone
        self.tempDir = tempfile.mkdtemp(prefix="SlicerUNetSeg-")
        self.state = "running"  # running, cancelling, done, failed, cancelled
        self.stage, self.fraction = "starting", 0.0
        self.segmentationNode = None
        self.error: str | None = None
        self.errorDetails: str | None = None
        self.timings: dict[str, float] = {}
        self.messages: list[str] = []
        self.warm = False
        self.device = None
        self.runtime = None  # which ran the network: torch, openvino or onnxruntime
        self.startTime = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class SlicerUNetSegLogic(ScriptedLoadableModuleLogic):
    """Runs models on volume nodes; usable from scripts. ``runner`` defaults to a ``WorkerRunner``."""

    def __init__(self, runner: InferenceRunner | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner: InferenceRunner = runner or WorkerRunner()
        self.job: SegmentationJob | None = None
        self.environment: dict[str, Any] | None = None
        self.onEnvironment: Callable[[dict[str, Any]], None] | None = None

    def getParameterNode(self):
        return SlicerUNetSegParameterNode(super().getParameterNode())

    # ---- models -----------------------------------------------------------------------------------
    @staticmethod
    def listModels() -> list[dict[str, Any]]:
        """Summaries of the installed models (reads JSON only; torch is not imported)."""
        from unetseg_engine import modelpkg

        try:
            packages = modelpkg.list_models()
        except ImportError:
            # Before the first Segment installs jsonschema the panel still lists the packages (read as
            # plain JSON); each one is validated, and its weights checked, before it is used.
            packages = modelpkg.scan_models(validate=False)[0]
        return [package.summary() for package in packages]

    @staticmethod
    def getModel(modelId: str | None = None):
        from unetseg_engine.modelpkg import get_model

        return get_model(modelId or None)

    @staticmethod
    def importModel(path: str, overwrite: bool = False) -> dict[str, Any]:
        """Validate a model package (.zip or folder), check its weights, and install it for the user."""
        from unetseg_engine.modelpkg import import_model

        return import_model(path, overwrite=overwrite).summary()

    def requestEnvironment(self, onEnvironment: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Ask the worker for PyTorch/CUDA versions and the GPU; the answer arrives through poll()."""
        if onEnvironment is not None:
            self.onEnvironment = onEnvironment
        self.runner.requestInfo()

    # ---- running ----------------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.job is not None and not self.job.finished

    def startSegmentation(self, inputVolumes, outputSegmentation=None, modelId: str | None = None,
                          device: str = "auto", window=None, replaceExisting: bool = False,
                          overlap: float | None = None, tta: bool = False, postprocess: bool = True,
                          onProgress: ProgressCallback | None = None,
                          onDone: Callable[[SegmentationJob], None] | None = None,
                          runtime: str = "auto") -> SegmentationJob:
        """Check everything, write the inputs for the worker and start it; returns at once.

        Raises UNetSegError (nothing in the scene changed) for problems found before the run: wrong
        number of inputs, unusable volumes, a non-linear transform, an output segmentation that has
        segments while ``replaceExisting`` is False, or a run already going on.
        """
        if self.isRunning():
            raise UNetSegError("A segmentation is already running; cancel it or wait for it to finish.")
        if not isinstance(inputVolumes, (list, tuple)):
            inputVolumes = [inputVolumes]
        model = self.getModel(modelId)
        channels = [item["name"] for item in model.meta["inputs"]]
        if len(inputVolumes) != len(channels):
            raise UNetSegError(f"Model '{model.meta['title']}' needs {len(channels)} input volume(s) "
                               f"({', '.join(channels)}); select one volume for each.")
        transforms = {checkVolume(volume, f"input volume '{channel}'") for volume, channel
                      in zip(inputVolumes, channels)}
        if len(transforms) > 1:
            raise UNetSegError("The input volumes are under different transforms; harden them (Data "
                               "module: right-click > Harden transform) so they share one frame.")
        check_device(device)
        if runtime not in RUNTIMES:
            raise UNetSegError(f"Unknown runtime '{runtime}': use {', '.join(RUNTIMES)}.")
        if outputSegmentation is not None and not replaceExisting and \
                outputSegmentation.GetSegmentation().GetNumberOfSegments() > 0:
            raise UNetSegError(
                f"The segmentation '{outputSegmentation.GetName()}' already has "
                f"{outputSegmentation.GetSegmentation().GetNumberOfSegments()} segments, which would be "
                "replaced. Choose 'Create new segmentation' or confirm the replacement "
                "(replaceExisting=True).")
        job = SegmentationJob(list(inputVolumes), outputSegmentation, model,
                              list(window) if window is not None else None, onProgress, onDone)
        try:
            t = time.perf_counter()
            inputs = [writeVolumeForWorker(volume, f"{job.tempDir}/input_{index}.nrrd")
                      for index, volume in enumerate(inputVolumes)]
            job.timings["write_input_s"] = time.perf_counter() - t
            self.runner.start({
                "id": job.id, "model": str(model.path), "device": device, "runtime": runtime,
                "window": job.window,
                "overlap": overlap, "tta": tta, "postprocess": postprocess, "inputs": inputs,
                "output_dir": f"{job.tempDir}/output"})
        except BaseException:
            shutil.rmtree(job.tempDir, ignore_errors=True)
            raise
        self.job = job
        return job

    def cancel(self) -> None:
        """Stop the running segmentation; the scene is left as it was. Takes effect within ~1 s."""
        if self.isRunning():
            self.job.state = "cancelling"
            self.runner.cancel()

    def poll(self) -> bool:
        """Handle the worker's events (call it often, e.g. from a QTimer); True while a job runs."""
        for event in self.runner.poll():
            kind = event.get("event")
            if kind == "hello":
                self.environment = event
                if self.onEnvironment:
                    self.onEnvironment(event)
                continue
            job = self.job
            if job is None or str(event.get("id")) != job.id or job.finished:
                continue
            if kind == "progress":
                job.stage, job.fraction = event["stage"], float(event["fraction"])
                if job.onProgress:
                    job.onProgress(job.stage, job.fraction)
            elif kind == "done":
                if job.state == "cancelling":
                    self._end(job, "cancelled", "Segmentation was cancelled.")
                else:
                    self._build(job, event)
            elif kind == "error":
                cancelled = event.get("kind") == "cancelled" or job.state == "cancelling"
                self._end(job, "cancelled" if cancelled else "failed", event.get("message", "Unknown error"),
                          event.get("details") or event.get("traceback"))
        return self.isRunning()

    def _build(self, job: SegmentationJob, event: dict[str, Any]) -> None:
        """Read the worker's labels and build the segmentation; on any failure the scene is restored."""
        import SimpleITK as sitk

        if job.onProgress:
            job.onProgress("building segments", 0.0)
        t = time.perf_counter()
        created = None
        try:
            volume = job.inputVolumes[0]
            labelImage = sitk.ReadImage(event["label_map"])
            labelMap = sitk.GetArrayViewFromImage(labelImage)  # a view: no second full-size copy
            if labelMap.shape != slicer.util.arrayFromVolume(volume).shape:
                raise UNetSegError(f"The labels came back with shape {labelMap.shape}, not the input's "
                                   f"{slicer.util.arrayFromVolume(volume).shape}; please report this.")
            masks = None
            if event.get("masks") is not None:
                masks = {int(value): (tuple(item["start"]), np.load(item["path"]))
                         for value, item in event["masks"].items()}
            # Build into a node outside the scene first, so a failure cannot leave half a result.
            staging = slicer.vtkMRMLSegmentationNode()
            fillSegmentation(staging, volume, labelMap, job.model.labels, masks)
            node = job.outputNode
            if node is None:
                created = node = volume.GetScene().AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"{volume.GetName()} {job.model.id}")
            with slicer.util.NodeModify(node):  # ends the modification even if a call raises
                # Under the volume's transform first: the reference geometry is computed relative to
                # the segmentation's own transform, so setting it afterwards would apply it twice.
                node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
                node.GetSegmentation().DeepCopy(staging.GetSegmentation())
                node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            placeLikeVolume(node, volume)
        except Exception as error:
            if created is not None:
                created.GetScene().RemoveNode(created)
            message = str(error) if isinstance(error, UNetSegError) else \
                f"Could not build the segmentation ({type(error).__name__}: {error})."
            self._end(job, "failed", message)
            return
        job.timings.update(event.get("timings", {}))
        job.timings["build_segmentation_s"] = time.perf_counter() - t
        job.segmentationNode, job.warm, job.device = node, bool(event.get("warm")), event.get("device")
        job.runtime = event.get("runtime", "torch")
        job.messages = list(event.get("messages", []))
        self._end(job, "done")

    def _end(self, job: SegmentationJob, state: str, error: str | None = None, details=None) -> None:
        job.state, job.error, job.errorDetails = state, error, details
        job.timings["total_s"] = time.perf_counter() - job.startTime
        shutil.rmtree(job.tempDir, ignore_errors=True)
        if job.onDone:
            job.onDone(job)

    def process(self, inputVolumes, outputSegmentation=None, modelId: str | None = None,
                device: str = "auto", window=None, replaceExisting: bool = False,
                onProgress: ProgressCallback | None = None, timeoutS: float | None = None, **options):
        """Segment and wait; returns the segmentation node. Raises UNetSegError (CancelledError when
        cancelled). In the application the GUI keeps repainting while this waits."""
        job = self.startSegmentation(inputVolumes, outputSegmentation, modelId, device, window,
                                     replaceExisting, onProgress=onProgress, **options)
        app = getattr(slicer, "app", None)
        while self.poll():
            if timeoutS is not None and time.perf_counter() - job.startTime > timeoutS:
                self.cancel()
                timeoutS = None
            if app is not None:
                app.processEvents()
            time.sleep(0.02)
        if job.state == "cancelled":
            raise CancelledError(job.error or "Segmentation was cancelled.")
        if job.state == "failed":
            raise UNetSegError(job.error)
        return job.segmentationNode

    def shutdown(self) -> None:
        """Stop the worker process (called when the module is cleaned up)."""
        self.cancel()
        self.runner.shutdown()
