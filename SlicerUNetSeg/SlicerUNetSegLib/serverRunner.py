"""Runs segmentations on an ``unetseg serve`` server instead of a local worker process.

It speaks the same ``InferenceRunner`` protocol as ``WorkerRunner`` and produces the same events
(``progress``, ``done`` with a label map on the input's grid, ``error``), so the logic, the panel's
progress bar, Cancel and the segmentation building are the same for both.

A run is one background thread: the input (written by the logic as the worker's uncompressed .nrrd,
geometry given in the request) is rewritten as a compressed NRRD carrying that geometry, uploaded,
followed until done, and the label map downloaded; ``poll`` hands the events to the GUI thread. The
token lives in Slicer's settings (see the widget), never in the scene: it is handed to this object.
Multi-label models (overlapping segments) are not run on a server yet: the label map the server
returns cannot hold overlaps, so they are refused with a message.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unetseg_engine.errors import CancelledError, UNetSegError
from unetseg_engine.server.client import ServerClient

if TYPE_CHECKING:
    from unetseg_engine.modelpkg import ModelPackage


class ServerRunner:
    """An ``InferenceRunner`` on a server; ``url`` and ``token`` come from the panel's settings."""

    def __init__(self, url: str, token: str, pollS: float = 0.2) -> None:
        self.client = ServerClient(url, token)
        self.url, self.token, self.pollS = self.client.url, token, pollS
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.activeId: str | None = None
        self.cancelRequested = threading.Event()
        self.thread: threading.Thread | None = None
        self._models: dict[str, Any] | None = None

    # ---- what the server has ------------------------------------------------------------------------
    def serverModels(self, refresh: bool = False) -> dict[str, Any]:
        """The server's answer to ``GET /models`` (cached): summaries, metadata, environment."""
        if self._models is None or refresh:
            self._models = self.client.models()
        return self._models

    def model(self, modelId: str | None) -> ModelPackage:
        """The served model as a ``ModelPackage`` description (labels, inputs; no weights here)."""
        from unetseg_engine.modelpkg import ModelPackage

        served = self.serverModels()
        metadata = served["metadata"]
        modelId = modelId or next(iter(metadata), None)
        if modelId not in metadata:
            raise UNetSegError(f"The server at {self.url} does not serve the model '{modelId}'; it has: "
                               f"{', '.join(metadata) or 'none'}.")
        meta = metadata[modelId]
        if meta["output"]["type"] == "multilabel":
            raise UNetSegError(f"'{meta['title']}' has overlapping (multi-label) segments, which are not "
                               "run on a server yet; run it on this computer.")
        return ModelPackage(Path(f"server/{modelId}"), meta)

    # ---- InferenceRunner ------------------------------------------------------------------------------
    def start(self, request: dict[str, Any]) -> None:
        if self.activeId is not None:
            raise RuntimeError("A segmentation is already running; cancel it or wait for it to finish.")
        if len(request["inputs"]) != 1:
            raise UNetSegError("The server runs single-input models only.")
        self.activeId = str(request["id"])
        self.cancelRequested.clear()
        self.thread = threading.Thread(target=self._run, args=(request,), daemon=True)
        self.thread.start()

    def requestInfo(self) -> None:
        def ask() -> None:
            try:
                environment = self.serverModels(refresh=True)["environment"]
                self.events.put(dict(environment, event="hello", server=self.url))
            except UNetSegError as error:
                self.events.put({"event": "hello", "server": self.url, "torch": None, "error": str(error)})

        threading.Thread(target=ask, daemon=True).start()

    def poll(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return out
            if event.get("event") in ("done", "error") and str(event.get("id")) == self.activeId:
                self.activeId = None
            out.append(event)

    def cancel(self) -> None:
        if self.activeId is not None:
            self.cancelRequested.set()

    def isBusy(self) -> bool:
        return self.activeId is not None

    def shutdown(self) -> None:
        """Cancel a running job on the server and wait (bounded) for the thread to end."""
        self.cancel()
        if self.thread is not None:
            self.thread.join(timeout=5)

    # ---- one run --------------------------------------------------------------------------------------
    def _run(self, request: dict[str, Any]) -> None:
        import SimpleITK as sitk

        jobId = str(request["id"])

        def progress(stage: str, fraction: float) -> None:
            self.events.put({"event": "progress", "id": jobId, "stage": stage, "fraction": fraction})

        serverJob = None
        try:
            t = time.perf_counter()
            item = request["inputs"][0]
            out = Path(request["output_dir"])
            out.mkdir(parents=True, exist_ok=True)
            upload = out / "input.nrrd"
            image = sitk.ReadImage(item["path"])  # its header holds the geometry (workerprotocol)
            sitk.WriteImage(image, str(upload), useCompression=True)
            del image
            if self.cancelRequested.is_set():
                raise CancelledError()
            progress("uploading to the server", 0.0)
            serverJob = self.client.submit(upload, request["model_id"], output="nrrd")["id"]
            uploadS = time.perf_counter() - t
            upload.unlink()
            done = self.client.wait(serverJob, progress, cancel=self.cancelRequested.is_set,
                                    poll_s=self.pollS)
            progress("downloading the result", 0.0)
            t = time.perf_counter()
            labels = self.client.download(serverJob, out / "labels.nrrd")
            timings = dict(done.get("timings", {}), upload_s=uploadS, download_s=time.perf_counter() - t)
            self.events.put({"event": "done", "id": jobId, "label_map": str(labels), "masks": None,
                             "timings": timings, "device": f"server {self.url}", "runtime": "torch",
                             "messages": done.get("notes", []), "model": request["model_id"], "warm": True})
        except CancelledError as error:
            self._forget(serverJob)
            self.events.put({"event": "error", "id": jobId, "kind": "cancelled", "message": str(error)})
        except UNetSegError as error:
            self._forget(serverJob)
            self.events.put({"event": "error", "id": jobId, "kind": "user", "message": str(error)})
        except Exception as error:  # a bug: reported, not lost in a thread
            import traceback

            self.events.put({"event": "error", "id": jobId, "kind": "internal",
                             "message": f"{type(error).__name__}: {error}",
                             "details": traceback.format_exc()})

    def _forget(self, serverJob: str | None) -> None:
        """Delete our job on the server after a failure or a cancel (its files go with it)."""
        if serverJob is None:
            return
        try:
            self.client.delete(serverJob)
        except UNetSegError:
            pass  # gone already, or the server is down: it expires there
