"""A long-lived inference process: ``python -m unetseg_engine.worker``.

The Slicer module runs inference here rather than in Slicer's own process, as SlicerNNUnet does: the
GUI stays responsive, a crash or an out-of-memory kill takes down only this process, and the model
stays loaded between requests (the second Segment on the same model skips loading: "warm").

Protocol: JSON lines (UTF-8). The parent writes one request per line on stdin; the worker writes one
event per line on its *original* stdout. Everything else (library prints, warnings) goes to stderr,
so nothing a library prints can corrupt the protocol.

Requests
  ``{"cmd": "hello"}`` -> ``{"event": "hello", "python", "torch", "cuda", "cuda_available",
  "gpu_name", "monai", "pid"}``
  ``{"cmd": "segment", "id": str, "model": id or package folder or null, "device": "auto|cpu|cuda",
  "runtime": "auto|torch|openvino|onnxruntime" (default auto), "window": [level, width] or null,
  "overlap", "sw_batch_size", "tta", "postprocess", "uncertainty" (bool, default false),
  "inputs": [{"path": uncompressed .nrrd, "spacing": [x, y, z], "origin": [x, y, z] (LPS),
  "direction": 9 numbers, row-major, columns = i, j, k axes in LPS}], "output_dir": folder}``.
  The voxels are read from the file in (k, j, i) order; the geometry given in the request is
  authoritative (the Slicer side owns IJK-to-RAS and converts it to LPS).
  ``{"cmd": "finetune", "id": str, "model": id or folder, "dataset": folder, "output": new run folder,
  "validation_dataset": folder or null, "settings": {FinetuneSettings fields}}``: ``unetseg finetune``
  (train, evaluate both, install only if not worse); ``done`` carries ``"result"``
  (``FinetuneResult.to_json()``: accepted, gate figures, versions, paths). Cancel stops it between
  training iterations and evaluation windows; nothing is installed after a cancel.
  ``{"cmd": "cancel", "id": str}``: handled at once by the reader thread; the run checks it between
  its stages (reading, finding the model, loading it, preprocessing, resampling back) and between
  sliding windows, so it stops within about one window's or one stage's time.
  ``{"cmd": "quit"}``, or end of stdin: the worker exits.

Events
  ``{"event": "progress", "id", "stage", "fraction"}``
  ``{"event": "done", "id", "label_map": path of a .nrrd on the first input's grid, "masks":
  {value: {"path": .npy of a bool (k, j, i) array, "start": [i, j, k], "size": [i, j, k]}} or null,
  "timings", "device", "runtime" (which ran the network), "messages", "model", "warm",
  "review": [per label {"value", "name", "volume_ml", "confidence", "flags": [{"code", "message"}],
  "focus_ras", "measures"}] (always; ``review.py``), "uncertainty": path of uncertainty.nrrd (uint8 on
  the first input's grid) when the request asked for it, else null}``
  ``{"event": "error", "id", "kind": "user" | "cancelled" | "internal", "message"}``
"""

from __future__ import annotations

import json
import os
import platform
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from .errors import CancelledError, UNetSegError


class Worker:
    """Serves requests one at a time; keeps one Predictor (and its model) warm."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.write_lock = threading.Lock()
        self.requests: queue.Queue[dict[str, Any]] = queue.Queue()
        self.cancelled: set[str] = set()
        self.predictor = None
        self.predictor_key: tuple[str, str] | None = None  # (device, runtime) it was built for

    # ---- I/O --------------------------------------------------------------------------------------
    def emit(self, **event: Any) -> None:
        with self.write_lock:
            self.out.write(json.dumps(event) + "\n")
            self.out.flush()

    def read_requests(self, stream: TextIO) -> None:
        """Reader thread: cancel takes effect at once; everything else queues for the main loop."""
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError:
                self.emit(event="error", id=None, kind="internal", message=f"Bad request line: {line!r}")
                continue
            if not isinstance(request, dict):  # valid JSON, but not a request: answer and keep serving
                self.emit(event="error", id=None, kind="internal",
                          message=f"Bad request (not a JSON object): {line[:200]!r}")
                continue
            if request.get("cmd") == "cancel":
                self.cancelled.add(str(request.get("id")))
            else:
                self.requests.put(request)
        self.cancelled.add("*")  # the parent went away: stop what runs and exit
        self.requests.put({"cmd": "quit"})

    # ---- requests ---------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            request = self.requests.get()
            cmd = request.get("cmd")
            if cmd == "quit":
                return
            if cmd == "hello":
                self.emit(event="hello", **environment_info())
            elif cmd == "segment":
                self.segment(request)
            elif cmd == "finetune":
                self.run_job(request, self._finetune)
            else:
                self.emit(event="error", id=request.get("id"), kind="internal",
                          message=f"Unknown command {cmd!r}")

    def _predictor(self, request: dict[str, Any]):
        from .inference import Predictor

        key = (request.get("device") or "auto", request.get("runtime") or "auto")
        if self.predictor is None or self.predictor_key != key:
            self.predictor = Predictor(device=key[0], runtime=key[1])
            self.predictor_key = key
        p = self.predictor
        p.overlap = request.get("overlap")
        p.sw_batch_size = request.get("sw_batch_size")
        p.tta = bool(request.get("tta", False))
        p.postprocess = bool(request.get("postprocess", True))
        p.uncertainty = bool(request.get("uncertainty", False))
        return p

    def segment(self, request: dict[str, Any]) -> None:
        self.run_job(request, self._segment)

    def run_job(self, request: dict[str, Any], run) -> None:
        """``run(job, request)`` -> the done event's fields; every failure becomes an error event."""
        job = str(request.get("id"))
        try:
            result = run(job, request)
        except CancelledError as error:
            self.emit(event="error", id=job, kind="cancelled", message=str(error))
        except UNetSegError as error:
            self.emit(event="error", id=job, kind="user", message=str(error))
        except MemoryError:
            self.emit(event="error", id=job, kind="user",
                      message="Out of memory. Close other programs, crop the volume to the region "
                              "of interest, or use a machine with more memory.")
        except Exception as error:  # a bug: report it with its traceback instead of dying silently
            traceback.print_exc(file=sys.stderr)
            self.emit(event="error", id=job, kind="internal",
                      message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        else:
            self.emit(event="done", id=job, **result)
        finally:
            self.cancelled.discard(job)

    def _progress(self, job: str):
        """A progress callback that sends an event per stage and per 1 % (at most 10 a second)."""
        last = {"stage": None, "fraction": -1.0, "time": 0.0}

        def progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if stage != last["stage"] or fraction >= 1.0 or (
                    fraction - last["fraction"] >= 0.01 and now - last["time"] > 0.1):
                last.update(stage=stage, fraction=fraction, time=now)
                self.emit(event="progress", id=job, stage=stage, fraction=round(float(fraction), 4))

        return progress

    def _finetune(self, job: str, request: dict[str, Any]) -> dict[str, Any]:
        from .finetune import FinetuneSettings, _finite, finetune

        settings = FinetuneSettings(**(request.get("settings") or {}))
        result = finetune(request.get("model"), request["dataset"], request["output"], settings,
                          validation_dataset=request.get("validation_dataset"),
                          progress=self._progress(job),
                          cancel=lambda: job in self.cancelled or "*" in self.cancelled,
                          log=lambda text: print(text, file=sys.stderr, flush=True))
        return {"result": _finite(result.to_json()), "summary": result.summary()}

    def _segment(self, job: str, request: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import SimpleITK as sitk

        from .imageio import image_from_array
        from .modelpkg import get_model

        def is_cancelled() -> bool:
            return job in self.cancelled or "*" in self.cancelled

        def check_cancelled() -> None:
            if is_cancelled():
                raise CancelledError()

        progress = self._progress(job)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        progress("reading input", 0.0)
        images = []
        for index, item in enumerate(request["inputs"]):
            try:
                array = sitk.GetArrayFromImage(sitk.ReadImage(str(item["path"])))
            except RuntimeError as error:
                raise UNetSegError(f"Could not read input volume {index + 1} ({error}).") from None
            images.append(image_from_array(array, item["spacing"], item["origin"], item["direction"]))
            check_cancelled()
        timings["read_s"] = time.perf_counter() - t

        t = time.perf_counter()
        package = get_model(request.get("model"))
        check_cancelled()
        predictor = self._predictor(request)  # imports torch the first time: seconds
        check_cancelled()
        warm = predictor.has_loaded(package)
        progress("loading model" if not warm else "model already loaded", 0.0)
        predictor.load(package)
        timings["load_model_s"] = time.perf_counter() - t
        check_cancelled()
        window = request.get("window")
        result = predictor.predict(images, window=tuple(window) if window else None, progress=progress,
                                   cancel=is_cancelled)
        timings.update(result.timings)
        check_cancelled()

        t = time.perf_counter()
        out_dir = Path(request["output_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        label_path = out_dir / "labels.nrrd"
        sitk.WriteImage(result.label_map, str(label_path), useCompression=False)
        masks = None
        if result.masks is not None:
            masks = {}
            for value, (box, mask) in result.masks.items():
                path = out_dir / f"mask_{value}.npy"
                np.save(path, np.ascontiguousarray(mask, dtype=bool))
                masks[str(value)] = {"path": str(path), "start": list(map(int, box.start)),
                                     "size": list(map(int, box.size))}
        uncertainty = None
        if result.uncertainty is not None:  # asked for with "uncertainty": true
            uncertainty = out_dir / "uncertainty.nrrd"
            sitk.WriteImage(result.uncertainty, str(uncertainty), useCompression=True)
        timings["write_s"] = time.perf_counter() - t
        return {"label_map": str(label_path), "masks": masks, "timings": timings,
                "device": result.device, "runtime": result.runtime, "messages": result.messages,
                "model": package.id, "warm": warm, "review": result.review or [],
                "uncertainty": str(uncertainty) if uncertainty is not None else None}


def environment_info() -> dict[str, Any]:
    """Python, PyTorch and CUDA versions and the GPU, for the panel's device line."""
    info: dict[str, Any] = {"python": platform.python_version(), "pid": os.getpid()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda,
                    cuda_available=bool(torch.cuda.is_available()))
        info["gpu_name"] = torch.cuda.get_device_name(0) if info["cuda_available"] else None
    except Exception as error:  # reported, not fatal: the panel says what is missing
        info.update(torch=None, cuda=None, cuda_available=False, gpu_name=None,
                    torch_error=f"{type(error).__name__}: {error}")
    try:
        import monai

        info["monai"] = monai.__version__
    except Exception:
        info["monai"] = None
    return info


def main() -> int:
    # Keep the protocol stream to ourselves: fd 1 becomes stderr for everything else (C code too).
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)
    worker = Worker(protocol)
    worker.emit(event="ready", pid=os.getpid())  # first, before any answer the reader may give
    threading.Thread(target=worker.read_requests, args=(stdin,), daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
