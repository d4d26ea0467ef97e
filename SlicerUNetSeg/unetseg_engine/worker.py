"""A long-lived inference process: ``python -m unetseg_engine.worker``.

The Slicer module runs inference here rather than in Slicer's own process, as SlicerNNUnet does: the
GUI stays responsive, a crash or an out-of-memory kill takes down only this process, and the model
stays loaded between requests (the second Segment on the same model skips loading: "warm").

Protocol: JSON lines (UTF-8). The parent writes one request per line on stdin; the worker writes one
event per line on its *original* stdout. Everything else (library prints, warnings) goes to stderr,
so nothing a library prints can corrupt the protocol.

The messages are the dataclasses of ``workerprotocol`` (version ``PROTOCOL_VERSION``), which the
Slicer side's ``workerRunner`` imports too; a line that is not one of them is answered with an error
event that says what is wrong, and the worker keeps serving.

Requests: ``hello`` (answered with the versions and the GPU), ``segment`` (one scan: the input files'
headers carry the geometry), ``finetune`` (``unetseg finetune``: train, evaluate both, install only if
not worse), ``cancel`` (handled at once by the reader thread; the run checks it between its stages and
between sliding windows, so it stops within about one window's or one stage's time; nothing is
installed after a cancelled fine-tune), ``quit`` (or the end of stdin: the worker exits).

Events: ``ready`` (first, with the pid and the protocol version), ``hello``, ``progress``, ``done``
(``SegmentDone`` or ``FinetuneDone``) and ``error`` (kind ``user``, ``cancelled`` or ``internal``).

Memory: each input is held once, as the ``SimpleITK.Image`` read from its file with the header's
geometry (protocol 1 held it two or three times: the image read, a numpy copy, an image rebuilt from it).
"""

from __future__ import annotations

import os
import platform
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import CancelledError, UNetSegError
from .workerprotocol import (
    PROTOCOL_VERSION,
    CancelRequest,
    ErrorEvent,
    Event,
    FinetuneDone,
    FinetuneRequest,
    HelloEvent,
    HelloRequest,
    MaskFile,
    ProgressEvent,
    ProtocolError,
    QuitRequest,
    ReadyEvent,
    Request,
    RunSettings,
    SegmentDone,
    SegmentRequest,
    parse_request,
    to_line,
)

if TYPE_CHECKING:
    from .inference import Predictor

ProgressCallback = Callable[[str, float], None]


def checked_settings(settings: RunSettings) -> dict[str, Any]:
    """The one place a request's per-run settings are checked, before anything is read or loaded:
    ``inference.RunSettings`` refuses them as the predictor's constructor does
    (``checks.check_settings``). Returns them as ``Predictor.with_settings`` takes them."""
    from dataclasses import asdict

    from .inference import RunSettings as PredictorSettings

    changes = asdict(settings)
    PredictorSettings(**changes)  # raises UNetSegError for an overlap out of range, a batch below 1
    return changes


class Worker:
    """Serves requests one at a time; keeps one Predictor (and its model) warm."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.write_lock = threading.Lock()
        self.requests: queue.Queue[Request] = queue.Queue()
        self.cancelled: set[str] = set()
        self.predictor: Predictor | None = None
        self.predictor_key: tuple[str, str] | None = None  # (device, runtime) it was built for

    # ---- I/O --------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        line = to_line(event)
        with self.write_lock:
            self.out.write(line)
            self.out.flush()

    def read_requests(self, stream: TextIO) -> None:
        """Reader thread: cancel takes effect at once; everything else queues for the main loop."""
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                request = parse_request(line)
            except ProtocolError as error:  # answer and keep serving
                self.emit(ErrorEvent(id=_id_of(line), kind="internal", message=str(error)))
                continue
            if isinstance(request, CancelRequest):
                self.cancelled.add(request.id)
            else:
                self.requests.put(request)
        self.cancelled.add("*")  # the parent went away: stop what runs and exit
        self.requests.put(QuitRequest())

    # ---- requests ---------------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            request = self.requests.get()
            if isinstance(request, QuitRequest):
                return
            if isinstance(request, HelloRequest):
                self.emit(HelloEvent(**environment_info()))
            elif isinstance(request, SegmentRequest):
                self.segment(request)
            elif isinstance(request, FinetuneRequest):
                self.run_job(request.id, lambda: self._finetune(request))

    def _predictor(self, request: SegmentRequest) -> Predictor:
        """The warm predictor for the request's device and runtime (built again when they change);
        its own settings stay the defaults: each run gets ``with_settings``' copy."""
        from .inference import Predictor

        key = (request.device, request.runtime)
        if self.predictor is None or self.predictor_key != key:
            self.predictor = Predictor(device=key[0], runtime=key[1])
            self.predictor_key = key
        return self.predictor

    def segment(self, request: SegmentRequest) -> None:
        self.run_job(request.id, lambda: self._segment(request))

    def run_job(self, job: str, run: Callable[[], Event]) -> None:
        """``run()`` -> the done event; every failure becomes an error event."""
        try:
            result = run()
        except CancelledError as error:
            self.emit(ErrorEvent(id=job, kind="cancelled", message=str(error)))
        except UNetSegError as error:
            self.emit(ErrorEvent(id=job, kind="user", message=str(error)))
        except MemoryError:
            self.emit(ErrorEvent(id=job, kind="user",
                                 message="Out of memory. Close other programs, crop the volume to the "
                                         "region of interest, or use a machine with more memory."))
        except Exception as error:  # a bug: report it with its traceback instead of dying silently
            traceback.print_exc(file=sys.stderr)
            self.emit(ErrorEvent(id=job, kind="internal", message=f"{type(error).__name__}: {error}",
                                 traceback=traceback.format_exc()))
        else:
            self.emit(result)
        finally:
            self.cancelled.discard(job)

    def _is_cancelled(self, job: str) -> bool:
        return job in self.cancelled or "*" in self.cancelled

    def _progress(self, job: str) -> ProgressCallback:
        """A progress callback that sends an event per stage and per 1 % (at most 10 a second)."""
        last_stage: list[str | None] = [None]
        last = [-1.0, 0.0]  # fraction, time

        def progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if stage != last_stage[0] or fraction >= 1.0 or (
                    fraction - last[0] >= 0.01 and now - last[1] > 0.1):
                last_stage[0], last[0], last[1] = stage, fraction, now
                self.emit(ProgressEvent(id=job, stage=stage, fraction=round(float(fraction), 4)))

        return progress

    def _finetune(self, request: FinetuneRequest) -> FinetuneDone:
        from .finetune import FinetuneSettings, _finite, finetune

        job = request.id
        try:
            settings = FinetuneSettings(**request.settings)
        except TypeError as error:
            raise UNetSegError(f"Unknown fine-tuning setting ({error}); the settings are the fields of "
                               "unetseg_engine.finetune.FinetuneSettings.") from None
        result = finetune(request.model, request.dataset, request.output, settings,
                          validation_dataset=request.validation_dataset,
                          progress=self._progress(job),
                          cancel=lambda: self._is_cancelled(job),
                          log=lambda text: print(text, file=sys.stderr, flush=True))
        return FinetuneDone(id=job, result=_finite(result.to_json()), summary=result.summary())

    def _segment(self, request: SegmentRequest) -> SegmentDone:
        import numpy as np
        import SimpleITK as sitk

        from .modelpkg import get_model

        job = request.id

        def is_cancelled() -> bool:
            return self._is_cancelled(job)

        def check_cancelled() -> None:
            if is_cancelled():
                raise CancelledError()

        progress = self._progress(job)

        timings: dict[str, float] = {}
        t = time.perf_counter()
        progress("reading input", 0.0)
        images = []
        for index, item in enumerate(request.inputs):
            try:  # with the header's geometry: the one place it travels (see workerprotocol)
                images.append(sitk.ReadImage(item.path))
            except RuntimeError as error:
                raise UNetSegError(f"Could not read input volume {index + 1} ({error}).") from None
            check_cancelled()
        timings["read_s"] = time.perf_counter() - t

        t = time.perf_counter()
        package = get_model(request.model)
        check_cancelled()
        settings = checked_settings(request.settings)  # imports torch the first time: seconds
        base = self._predictor(request)
        check_cancelled()
        warm = base.has_loaded(package)
        progress("loading model" if not warm else "model already loaded", 0.0)
        base.load(package)
        predictor = base.with_settings(**settings)  # shares the loaded networks; base unchanged
        timings["load_model_s"] = time.perf_counter() - t
        check_cancelled()
        result = predictor.predict(images, window=request.window, progress=progress, cancel=is_cancelled)
        del images  # freed before the results are written
        timings.update(result.timings)
        check_cancelled()

        t = time.perf_counter()
        out_dir = Path(request.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        label_path = out_dir / "labels.nrrd"
        sitk.WriteImage(result.label_map, str(label_path), useCompression=False)
        masks = None
        if result.masks is not None:
            masks = {}
            for value, (box, mask) in result.masks.items():
                path = out_dir / f"mask_{value}.npy"
                np.save(path, np.ascontiguousarray(mask, dtype=bool))
                masks[str(value)] = MaskFile(path=str(path), start=list(map(int, box.start)),
                                             size=list(map(int, box.size)))
        uncertainty = None
        if result.uncertainty is not None:  # asked for with "uncertainty": true
            uncertainty = out_dir / "uncertainty.nrrd"
            sitk.WriteImage(result.uncertainty, str(uncertainty), useCompression=True)
        timings["write_s"] = time.perf_counter() - t
        return SegmentDone(id=job, label_map=str(label_path), masks=masks, timings=timings,
                           device=result.device, runtime=result.runtime, messages=list(result.messages),
                           model=package.id, warm=warm, review=list(result.review or []),
                           uncertainty=str(uncertainty) if uncertainty is not None else None)


def _id_of(line: str) -> str | None:
    """The id of a refused request line, where it has one, so the caller can match the error."""
    import json

    try:
        data = json.loads(line)
    except ValueError:
        return None
    return str(data["id"]) if isinstance(data, dict) and data.get("id") is not None else None


def environment_info() -> dict[str, Any]:
    """Python, PyTorch and CUDA versions and the GPU, for the panel's device line (the ``hello``
    event's fields; the server reports them too)."""
    info: dict[str, Any] = {"python": platform.python_version(), "pid": os.getpid(),
                            "utf8_mode": bool(sys.flags.utf8_mode)}
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
    # first, before any answer the reader may give
    worker.emit(ReadyEvent(pid=os.getpid(), protocol=PROTOCOL_VERSION))
    threading.Thread(target=worker.read_requests, args=(stdin,), daemon=True).start()
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
