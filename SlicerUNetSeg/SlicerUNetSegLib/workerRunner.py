"""Runs the engine in a separate, long-lived process (``python -m unetseg_engine.worker``).

Why a process and not a thread: PyTorch inference holds the CPU and memory; in Slicer's process a
crash or an out-of-memory kill would take Slicer down with it, and a Python thread would compete with
the GUI for the interpreter. In a child process the GUI only polls a queue (the panel does it from a
``qt.QTimer``), a crash costs only the worker, and the model stays loaded between runs (warm).

The logic depends on the ``InferenceRunner`` protocol, not on this class, so it can be driven by a
stand-in (as SlicerNNUnet injects its process runner).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

MODULE_DIR = Path(__file__).resolve().parent.parent  # holds the unetseg_engine package


class InferenceRunner(Protocol):
    """What the logic needs from whatever runs the engine."""

    def start(self, request: dict[str, Any]) -> None:
        """Send one segment request (see ``unetseg_engine.worker``); returns at once."""

    def requestInfo(self) -> None:
        """Ask for a ``hello`` event (Python, PyTorch, CUDA versions, GPU)."""

    def poll(self) -> list[dict[str, Any]]:
        """Events received since the last call (progress, done, error, hello)."""

    def cancel(self) -> None:
        """Ask the running request to stop; it ends with an error event of kind 'cancelled'."""

    def isBusy(self) -> bool:
        """True while a request has neither finished nor failed."""

    def shutdown(self) -> None:
        """Stop the process (the next request starts a fresh one)."""


def pythonExecutable() -> str:
    """Slicer's ``PythonSlicer`` when running in Slicer (it sets up Slicer's paths), else this Python."""
    found = shutil.which("PythonSlicer")
    return found or sys.executable


class WorkerRunner:
    """The engine's worker as a child process, talked to through JSON lines.

    A reader thread per pipe turns the worker's stdout into events and keeps the tail of its stderr for
    error messages; ``poll`` hands the events over on the caller's (GUI) thread. Cancel sends a cancel
    message; if the worker has not answered within ``cancelGraceS`` it is killed, and the next request
    starts a new one.
    """

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None,
                 cancelGraceS: float = 1.0) -> None:
        self.python = python or pythonExecutable()
        self.extraEnv = dict(env or {})
        self.cancelGraceS = cancelGraceS
        self.process: subprocess.Popen | None = None
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderrTail: deque[str] = deque(maxlen=40)
        self.activeId: str | None = None
        self.cancelDeadline: float | None = None
        self.starts = 0

    # ---- process ----------------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extraEnv)
        return env

    def _ensureProcess(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
        self.process = subprocess.Popen(
            [self.python, "-u", "-m", "unetseg_engine.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._environment(), cwd=str(MODULE_DIR),
            text=True, encoding="utf-8", bufsize=1, creationflags=flags)
        self.starts += 1
        self.stderrTail.clear()
        process = self.process
        threading.Thread(target=self._readStdout, args=(process,), daemon=True).start()
        threading.Thread(target=self._readStderr, args=(process,), daemon=True).start()

    def _readStdout(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                self.stderrTail.append(line.rstrip())
        self.events.put({"event": "_exited", "process": id(process)})

    def _readStderr(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self.stderrTail.append(line.rstrip())

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError, ValueError):
            pass  # the exit is noticed by the stdout reader and reported by poll()

    # ---- InferenceRunner --------------------------------------------------------------------------
    def start(self, request: dict[str, Any]) -> None:
        if self.activeId is not None:
            raise RuntimeError("A segmentation is already running; cancel it or wait for it to finish.")
        self._ensureProcess()
        self.activeId = str(request["id"])
        self.cancelDeadline = None
        self._send(dict(request, cmd="segment"))

    def requestInfo(self) -> None:
        self._ensureProcess()
        self._send({"cmd": "hello"})

    def cancel(self) -> None:
        if self.activeId is None:
            return
        self._send({"cmd": "cancel", "id": self.activeId})
        if self.cancelDeadline is None:
            self.cancelDeadline = time.monotonic() + self.cancelGraceS

    def isBusy(self) -> bool:
        return self.activeId is not None

    def poll(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if event.get("event") == "_exited":
                if self.process is not None and event["process"] == id(self.process):
                    out.extend(self._onExit())
                continue
            if event.get("event") in ("done", "error") and str(event.get("id")) == self.activeId:
                self.activeId, self.cancelDeadline = None, None
            out.append(event)
        if self.activeId is not None and self.cancelDeadline is not None and \
                time.monotonic() > self.cancelDeadline:
            jobId = self.activeId
            self._kill()
            out.append({"event": "error", "id": jobId, "kind": "cancelled",
                        "message": "Segmentation was cancelled (the worker was stopped)."})
        return out

    def _onExit(self) -> list[dict[str, Any]]:
        process, self.process = self.process, None
        code = process.wait() if process else None
        if self.activeId is None:
            return []
        jobId, self.activeId = self.activeId, None
        if self.cancelDeadline is not None:
            self.cancelDeadline = None
            return [{"event": "error", "id": jobId, "kind": "cancelled",
                     "message": "Segmentation was cancelled."}]
        hint = ""
        if code is not None and code in (-9, 137, -6, 134, 3221225477):
            hint = (" It was probably out of memory: close other programs, crop the volume, or choose "
                    "the GPU or CPU device with more memory.")
        tail = "\n".join(list(self.stderrTail)[-8:])
        return [{"event": "error", "id": jobId, "kind": "crashed",
                 "message": f"The segmentation process stopped unexpectedly (exit code {code}).{hint} "
                            f"Slicer and the scene are unaffected; press Segment to try again.",
                 "details": tail}]

    def _kill(self) -> None:
        process, self.process = self.process, None
        self.activeId, self.cancelDeadline = None, None
        if process is not None and process.poll() is None:
            process.kill()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self) -> None:
        process = self.process
        if process is None:
            return
        self._send({"cmd": "quit"})
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self._kill()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None
