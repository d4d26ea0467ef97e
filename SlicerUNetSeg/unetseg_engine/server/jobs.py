"""Server jobs: one folder each on disk, a queue, and warm workers that run them.

A job folder ``STATE/jobs/<id>/`` holds ``job.json`` (written atomically on every change of state),
``input/`` (the checked upload) and, once done, ``result.<ext>``. A job exists only once its upload is
complete and checked (``uploads``), so an interrupted upload never becomes a job.

Restart: the server reads every ``job.json`` at start. Queued jobs, and jobs that were running when the
server stopped, are **resumed** (queued again, in their original order); a job interrupted
``MAX_ATTEMPTS`` times is reported as failed instead, so a scan that kills the server cannot stop it
forever. Finished jobs keep their state until downloaded or expired.

Workers are threads, each with one warm ``Predictor`` per served model (the engine's own, loaded once):
PyTorch releases the interpreter during its kernels, so threads run in parallel on separate GPUs, and
one worker on a CPU uses all its cores (``--threads``). On a CUDA machine worker n runs on GPU n.
"""

from __future__ import annotations

import builtins
import json
import os
import queue
import secrets
import shutil
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CancelledError, UNetSegError
from ..outputs import atomic_write

# output type -> (pipeline.write_result kind, result file name)
OUTPUTS = {"seg.nrrd": ("seg.nrrd", "result.seg.nrrd"), "dicom-seg": ("dicom-seg", "result.dcm"),
           "nii.gz": ("label", "result.nii.gz"), "nrrd": ("label", "result.nrrd")}
MAX_ATTEMPTS = 2  # runs a job may be interrupted by a server stop before it is failed
FINISHED = ("done", "failed", "cancelled")


@dataclass
class Job:
    """What ``GET /jobs/{id}`` returns (plus where its files are)."""

    id: str
    model: str
    output: str  # a key of OUTPUTS
    input_name: str  # the uploaded file's name, for the user's eyes only
    input_path: str  # relative to the job folder: input/scan.nii.gz or input/dicom
    status: str = "queued"  # queued, running, done, failed, cancelled
    stage: str = "queued"
    fraction: float = 0.0
    message: str = ""
    notes: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    attempts: int = 0  # runs started (a restart while running counts one)
    timings: dict[str, float] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("input_path")
        return out


class JobStore:
    """Jobs in memory and on disk, the queue, and the workers. Thread-safe."""

    def __init__(self, state_dir: Path, models: dict[str, Any], *, workers: int | None = None,
                 device: str = "auto",
                 runtime: str = "auto", threads: int | None = None, keep_s: float = 3600.0,
                 max_queued: int = 200) -> None:
        self.root = Path(state_dir)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.models, self.keep_s, self.max_queued = models, keep_s, max_queued
        self.device, self.runtime, self.threads, self.n_workers = device, runtime, threads, workers
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.cancelled: set[str] = set()
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.threads_: list[threading.Thread] = []
        self.stopping = threading.Event()
        self.resumed = self._load()

    # ---- disk ---------------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _save(self, job: Job) -> None:
        text = json.dumps(asdict(job), indent=1)
        atomic_write(self.folder(job.id) / "job.json", lambda tmp: Path(tmp).write_text(text, "utf-8"))

    def _load(self) -> list[str]:
        """Jobs left by an earlier run: resume the unfinished ones (see the module docstring)."""
        found = []
        for path in sorted(self.jobs_dir.glob("*/job.json")):
            try:
                job = Job(**json.loads(path.read_text("utf-8")))
            except (OSError, ValueError, TypeError):
                shutil.rmtree(path.parent, ignore_errors=True)  # not ours, or cut off mid-write
                continue
            if job.model not in self.models and job.status not in FINISHED:
                job.status, job.finished = "failed", time.time()
                job.message = f"The server restarted without model '{job.model}'; submit the scan again."
            elif job.status == "running" and job.attempts >= MAX_ATTEMPTS:
                job.status, job.finished = "failed", time.time()
                job.message = (f"The server stopped {job.attempts} times while this job ran; it was not "
                               "tried again. Check the scan, or the server's memory.")
            elif job.status == "running":
                job.status, job.stage, job.fraction = "queued", "queued (resumed after a restart)", 0.0
            self.jobs[job.id] = job
            self._save(job)
            found.append(job)
        found.sort(key=lambda j: j.created)
        for job in found:
            if job.status == "queued":
                self.queue.put(job.id)
        return [job.id for job in found if job.status == "queued"]

    # ---- jobs ---------------------------------------------------------------------------------------
    def new_job_id(self) -> str:
        return secrets.token_urlsafe(12)

    def check_room(self) -> None:
        """Refuse more work than the queue takes (``app`` answers 503) before an upload is read."""
        with self.lock:
            waiting = sum(job.status == "queued" for job in self.jobs.values())
        if waiting >= self.max_queued:
            raise QueueFull(f"The server's queue is full ({waiting} jobs waiting); try again later.")

    def add(self, job: Job) -> Job:
        """Register a job whose folder (with its checked input) is in place, and queue it."""
        with self.lock:
            self.jobs[job.id] = job
            self._save(job)
        self.queue.put(job.id)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def list(self) -> list[Job]:
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return job
            self.cancelled.add(job_id)
            if job.status == "queued":  # the worker that takes it off the queue skips it
                self._finish(job, "cancelled", "Cancelled before it ran.")
            return job

    def delete(self, job_id: str) -> bool:
        """Forget a job and remove its folder; a running job is cancelled first."""
        self.cancel(job_id)
        with self.lock:
            job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        shutil.rmtree(self.folder(job_id), ignore_errors=True)
        return True

    def result_path(self, job: Job) -> Path:
        return self.folder(job.id) / OUTPUTS[job.output][1]

    def expire(self, now: float | None = None) -> builtins.list[str]:  # (``list`` is the method)
        """Delete finished jobs older than ``keep_s`` (not downloaded in time)."""
        now = time.time() if now is None else now
        with self.lock:
            old = [j.id for j in self.jobs.values()
                   if j.finished is not None and now - j.finished > self.keep_s]
        for job_id in old:
            self.delete(job_id)
        return old

    def _finish(self, job: Job, status: str, message: str = "") -> None:
        """Set a final state (caller holds the lock)."""
        job.status, job.message, job.finished = status, message, time.time()
        job.stage, job.fraction = status, 1.0 if status == "done" else job.fraction
        self._save(job)

    # ---- workers ------------------------------------------------------------------------------------
    def start_workers(self) -> None:
        """Build each worker's warm predictors (every served model loaded), then start the threads."""
        import torch

        cuda = self.device in ("auto", "cuda") and torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise UNetSegError("--device cuda was asked for, but PyTorch sees no CUDA device.")
        if self.n_workers is None:  # one per GPU; on a CPU one, which uses every core
            self.n_workers = torch.cuda.device_count() if cuda else 1
        for index in range(self.n_workers):
            gpu = index % torch.cuda.device_count() if cuda else None
            predictors = self._predictors(gpu)
            thread = threading.Thread(target=self._work, args=(predictors, gpu), daemon=True,
                                      name=f"unetseg-worker-{index}")
            thread.start()
            self.threads_.append(thread)

    def _predictors(self, gpu: int | None) -> dict[str, Any]:
        from ..inference import Predictor

        if gpu is not None:
            import torch

            torch.cuda.set_device(gpu)  # "cuda" means this thread's current device from here on
        device = "cuda" if gpu is not None else ("cpu" if self.device == "auto" else self.device)
        predictors = {}
        for model_id, package in self.models.items():
            predictor = Predictor(device=device, runtime=self.runtime, num_threads=self.threads)
            predictor.load(package)
            predictors[model_id] = predictor
        return predictors

    def stop(self) -> None:
        """Stop the workers; a running job is interrupted and resumed by the next start."""
        self.stopping.set()
        for _ in self.threads_:
            self.queue.put(None)
        for thread in self.threads_:
            thread.join(timeout=5)

    def _work(self, predictors: dict[str, Any], gpu: int | None) -> None:
        if gpu is not None:
            import torch

            torch.cuda.set_device(gpu)
        while not self.stopping.is_set():
            job_id = self.queue.get()
            if job_id is None:
                return
            with self.lock:
                job = self.jobs.get(job_id)
                if job is None or job.status != "queued":
                    continue  # cancelled or deleted while it waited
                job.status, job.stage, job.attempts = "running", "reading input", job.attempts + 1
                self._save(job)
            self._run(job, predictors[job.model])

    def _run(self, job: Job, predictor) -> None:
        from ..imageio import read_image
        from ..pipeline import dicom_source, run_one

        folder = self.folder(job.id)
        kind, name = OUTPUTS[job.output]

        def progress(stage: str, fraction: float) -> None:
            job.stage, job.fraction = stage, round(float(fraction), 4)  # read by GET /jobs/{id}

        def is_cancelled() -> bool:
            return job.id in self.cancelled or self.stopping.is_set()

        try:
            t = time.perf_counter()
            source = folder / job.input_path
            images = [read_image(source)]
            dicom = dicom_source(source) if kind == "dicom-seg" else None
            read_s = time.perf_counter() - t
            if is_cancelled():
                raise CancelledError()
            _, timings, notes = run_one(predictor, images, folder / name, kind, progress=progress,
                                        dicom=dicom, cancel=is_cancelled)
        except CancelledError:
            with self.lock:
                if self.stopping.is_set() and job.id not in self.cancelled:
                    job.status, job.stage = "queued", "queued (interrupted by a server stop)"
                    self._save(job)  # resumed at the next start
                elif job.id in self.jobs:
                    self._finish(job, "cancelled", "Cancelled while it ran.")
            return
        except UNetSegError as error:
            outcome = ("failed", str(error))
        except MemoryError:
            outcome = ("failed", "The server ran out of memory on this scan; crop it or try later.")
        except Exception as error:  # a bug: the job says so, the worker keeps serving
            traceback.print_exc(file=sys.stderr)
            outcome = ("failed", f"Internal error on the server ({type(error).__name__}: {error}).")
        else:
            outcome = ("done", "")
            job.notes, job.timings = list(dict.fromkeys(notes)), dict(timings, read_s=read_s)
        with self.lock:
            self.cancelled.discard(job.id)
            if job.id not in self.jobs:  # deleted while it ran
                shutil.rmtree(folder, ignore_errors=True)
                return
            self._finish(job, *outcome)
        if outcome[0] == "done":
            _remove_input(folder / "input")  # the result is all that is left to hand out


def _remove_input(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        os.remove(path)


class QueueFull(UNetSegError):
    """More jobs are waiting than the server takes."""
