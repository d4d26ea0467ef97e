"""SlicerUNetSegLogic: segment volume nodes with a model package, without the panel.

From the Python console or a script::

    logic = slicer.util.getModuleLogic("SlicerUNetSeg")
    segmentation = logic.process(volumeNode)                   # blocks; default model, auto device
    segmentation = logic.process([t1, flair], None, "my-mr-model", device="cpu", window=None)

``logic.useServer(url, token)`` sends the next runs to an ``unetseg serve`` server instead (same
progress, cancel and result; ``useLocal()`` goes back). The panel uses the non-blocking pair
``startSegmentation`` (progress and completion callbacks) and
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
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from unetseg_engine.checks import check_device
from unetseg_engine.errors import CancelledError, UNetSegError
from unetseg_engine.runtimes import RUNTIME_CHOICES as RUNTIMES

from .geometry import checkVolume, writeVolumeForWorker
from .learning import FINETUNE_CANCEL_GRACE_S, LearningLogicMixin
from .parameters import SlicerUNetSegParameterNode
from .review import ReviewLogicMixin, removeNodeAndItsParts
from .segmentationBuilder import fillSegmentation, placeLikeVolume
from .serverRunner import ServerRunner
from .workerRunner import InferenceRunner, WorkerRunner

if TYPE_CHECKING:
    from unetseg_engine.modelpkg import ModelPackage

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
        self.review: list[dict[str, Any]] | None = None  # the engine's per-label review, as it sent it
        self.startTime = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class SlicerUNetSegLogic(ReviewLogicMixin, LearningLogicMixin, ScriptedLoadableModuleLogic):
    """Runs models on volume nodes; usable from scripts. ``runner`` defaults to a ``WorkerRunner``.
    Reviewing a result (review table, uncertainty overlay, change report) is in ``ReviewLogicMixin``;
    learning from corrections (``learning.py``) in ``LearningLogicMixin``, with a ``finetuneRunner``
    of its own."""

    def __init__(self, runner: InferenceRunner | None = None,
                 finetuneRunner: InferenceRunner | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner: InferenceRunner = runner or WorkerRunner()
        self.finetuneRunner: InferenceRunner = finetuneRunner or \
            WorkerRunner(cancelGraceS=FINETUNE_CANCEL_GRACE_S)
        self.finetuneJob = None
        self.job: SegmentationJob | None = None
        self.environment: dict[str, Any] | None = None
        self.onEnvironment: Callable[[dict[str, Any]], None] | None = None

    # ---- where it runs -------------------------------------------------------------------------------
    def useServer(self, url: str, token: str) -> ServerRunner:
        """Run the next segmentations on ``unetseg serve`` at ``url`` (the local worker is stopped);
        returns the server's runner (also ``self.server``)."""
        if self.isRunning():
            raise UNetSegError("A segmentation is running; wait for it or cancel it first.")
        runner = ServerRunner(url, token)
        self.runner.shutdown()
        self.runner, self.environment = runner, None
        return runner

    def useLocal(self) -> None:
        """Run the next segmentations in a worker process on this computer (the default)."""
        if self.isRunning():
            raise UNetSegError("A segmentation is running; wait for it or cancel it first.")
        if isinstance(self.runner, ServerRunner):
            self.runner.shutdown()
            self.runner, self.environment = WorkerRunner(), None

    @property
    def onServer(self) -> bool:
        return isinstance(self.runner, ServerRunner)

    @property
    def server(self) -> ServerRunner | None:
        """The runner of the server the segmentations run on, None when they run on this computer."""
        return self.runner if isinstance(self.runner, ServerRunner) else None

    def getParameterNode(self):
        # slicer.parameterNodeWrapper (untyped) gives the class a constructor that takes the MRML node
        return SlicerUNetSegParameterNode(super().getParameterNode())  # type: ignore[call-arg]

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
    def getModel(modelId: str | None = None) -> ModelPackage:
        from unetseg_engine.modelpkg import get_model

        return get_model(modelId or None)

    @staticmethod
    def importModel(path: str, overwrite: bool = False, licence: str | None = None) -> dict[str, Any]:
        """Validate a model package (.zip or folder), check its weights, and install it for the user.

        An nnU-Net v2 trained-model folder (or its plans.json) is converted (``nnunet.py``); it needs
        ``licence``, which nnU-Net folders never carry."""
        from pathlib import Path

        from unetseg_engine.modelpkg import import_model

        folder = nnunetFolder(path)
        if folder is not None:
            from unetseg_engine.errors import UNetSegError
            from unetseg_engine.nnunet import import_nnunet

            if not licence:
                raise UNetSegError("nnU-Net folders carry no licence: give the model's licence.")
            return import_nnunet(Path(folder), licence, overwrite=overwrite).summary()
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
                          runtime: str = "auto", uncertainty: bool = False) -> SegmentationJob:
        """Check everything, write the inputs for the worker and start it; returns at once.

        Raises UNetSegError (nothing in the scene changed) for problems found before the run: wrong
        number of inputs, unusable volumes, a non-linear transform, an output segmentation that has
        segments while ``replaceExisting`` is False, or a run already going on. ``uncertainty`` asks
        the engine for its uncertainty map too (``showUncertainty`` overlays it).
        """
        if self.isRunning():
            raise UNetSegError("A segmentation is already running; cancel it or wait for it to finish.")
        if not isinstance(inputVolumes, (list, tuple)):
            inputVolumes = [inputVolumes]
        # on a server, the model is the one it serves (its labels come from there)
        server = self.server
        model = server.model(modelId) if server else self.getModel(modelId)
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
                "id": job.id, "model": str(model.path), "model_id": model.id, "device": device,
                "runtime": runtime,
                "window": job.window,
                "overlap": overlap, "tta": tta, "postprocess": postprocess, "inputs": inputs,
                "uncertainty": bool(uncertainty),
                "output_dir": f"{job.tempDir}/output"})
        except BaseException:
            shutil.rmtree(job.tempDir, ignore_errors=True)
            raise
        self.job = job
        return job

    def cancel(self) -> None:
        """Stop the running segmentation; the scene is left as it was. Takes effect within ~1 s."""
        job = self.job
        if job is not None and not job.finished:
            job.state = "cancelling"
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
        created, reviewNodes = None, []
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
            segmentIds = fillSegmentation(staging, volume, labelMap, job.model.labels, masks)
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
            reviewNodes = self.keepReviewData(node, volume, segmentIds, job.model.labels, job.model.id,
                                              event)
        except Exception as error:
            for added in reviewNodes:
                removeNodeAndItsParts(added)
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
        job.review = event.get("review")
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
        """Stop the worker processes (called when the module is cleaned up)."""
        self.cancel()
        self.runner.shutdown()
        self.cancelFinetune()
        self.finetuneRunner.shutdown()


def nnunetFolder(path: str) -> str | None:
    """The nnU-Net trained-model folder ``path`` is (or whose plans.json/dataset.json it is), else None."""
    from pathlib import Path

    p = Path(path)
    folder = p.parent if p.name in ("plans.json", "dataset.json") else p
    if folder.is_dir() and (folder / "plans.json").is_file() and (folder / "dataset.json").is_file():
        return str(folder)
    return None
