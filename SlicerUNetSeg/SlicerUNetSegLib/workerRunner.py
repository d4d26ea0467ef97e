"""Runs the engine in a separate, long-lived process (``python -m unetseg_engine.worker``).

Why a process and not a thread: PyTorch inference holds the CPU and memory; in Slicer's process a
crash or an out-of-memory kill would take Slicer down with it, and a Python thread would compete with
the GUI for the interpreter. In a child process the GUI only polls a queue (the panel does it from a
``qt.QTimer``), a crash costs only the worker, and the model stays loaded between runs (warm).

The logic depends on the ``InferenceRunner`` protocol, not on this class, so it can be driven by a
stand-in (as SlicerNNUnet injects its process runner).

A worker is a process *tree*. In Slicer, ``PythonSlicer`` is the CTK application launcher: it sets up
the environment and runs ``bin/python-real`` as its child, forwarding stdin, stdout and stderr, and
exits with 1 after printing ``error: [...] exit abnormally`` when that child crashes (CTK's
``ctkAppLauncher::applicationFinished``). So stopping a worker closes its stdin first (it exits on end
of input), then kills the whole tree: its process group on POSIX (the worker is started in a session
of its own), and every psutil descendant where psutil is available (Windows). Each started worker is
a ``_Worker`` object, and events are matched to it by identity: ``id()`` of a dead Popen is reused.

The messages are ``unetseg_engine.workerprotocol``'s, the definitions the worker uses too: a request is
checked before it is sent (a bad one raises ``ProtocolError`` here, in the caller), and each event is
read back into its dataclass, so a worker of another protocol version, or a line that is no event, is
reported as an error instead of being half understood. ``poll`` hands events over as their JSON objects
(``workerprotocol.to_json``), the form the logic reads.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from unetseg_engine.errors import UNetSegError
from unetseg_engine.workerprotocol import (
    PROTOCOL_VERSION,
    CancelRequest,
    ErrorEvent,
    FinetuneRequest,
    HelloRequest,
    ProtocolError,
    QuitRequest,
    ReadyEvent,
    SegmentRequest,
    parse_event,
    parse_request,
    to_json,
    to_line,
)

MODULE_DIR = Path(__file__).resolve().parent.parent  # holds the unetseg_engine package


class InferenceRunner(Protocol):
    """What the logic needs from whatever runs the engine."""

    def start(self, request: dict[str, Any]) -> None:
        """Send one request (``segment`` unless it names its ``cmd``; see ``unetseg_engine.worker``);
        returns at once."""

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


# Exit codes of a process killed for memory: SIGKILL / SIGABRT as Popen reports them and as shells
# report them, and Windows' access violation.
KILLED_EXIT_CODES = (-9, 137, -6, 134, 3221225477)
# What the CTK launcher (PythonSlicer) prints on stderr when its child crashed; it then exits with 1.
LAUNCHER_CRASH_TEXT = "exit abnormally"
OUT_OF_MEMORY_HINT = (" It was probably out of memory: close other programs, crop the volume, or choose "
                      "the GPU or CPU device with more memory.")


class _Worker:
    """One started worker process (tree). Compared by identity; ``generation`` counts starts."""

    def __init__(self, popen: subprocess.Popen[str], generation: int) -> None:
        self.popen = popen
        self.generation = generation
        self.pid: int | None = None  # the engine's own process (python-real under Slicer's launcher)
        self.stderrTail: deque[str] = deque(maxlen=40)
        self.stderrDone = threading.Event()

    def alive(self) -> bool:
        return self.popen.poll() is None


def killProcessTree(popen: subprocess.Popen[str]) -> None:
    """Kill a process and all its descendants without waiting for them (the reader thread reaps).

    Descendants are listed before anything is killed: once the launcher is dead its children are
    re-parented and no longer found under it.
    """
    descendants = []
    try:
        import psutil

        try:
            descendants = psutil.Process(popen.pid).children(recursive=True)
        except psutil.Error:
            pass
    except ImportError:
        psutil = None
    if sys.platform != "win32":
        try:
            os.killpg(popen.pid, signal.SIGKILL)  # the worker leads its own process group
        except OSError:
            pass
    elif psutil is None and popen.poll() is None:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(popen.pid)], capture_output=True,
                       creationflags=subprocess.CREATE_NO_WINDOW, check=False)
    for child in descendants:
        try:
            child.kill()  # psutil checks the creation time: a reused pid is not killed
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        popen.kill()
    except OSError:
        pass


class WorkerRunner:
    """The engine's worker as a child process, talked to through JSON lines.

    A reader thread per pipe turns the worker's stdout into events and keeps the tail of its stderr for
    error messages; ``poll`` hands the events over on the caller's (GUI) thread and never blocks. Cancel
    sends a cancel message; if the worker has not answered within ``cancelGraceS`` its process tree is
    killed, and the next request starts a new one.

    ``python`` is the interpreter command (a path, or a list such as a launcher and its arguments);
    ``module`` the worker module it runs with ``-m``.
    """

    def __init__(self, python: str | list[str] | None = None, env: dict[str, str] | None = None,
                 cancelGraceS: float = 1.0, module: str = "unetseg_engine.worker") -> None:
        python = python or pythonExecutable()
        self.command = [python] if isinstance(python, str) else list(python)
        self.module = module
        self.extraEnv = dict(env or {})
        self.cancelGraceS = cancelGraceS
        self.worker: _Worker | None = None
        self.events: queue.Queue[tuple[_Worker, dict[str, Any]]] = queue.Queue()
        self.activeId: str | None = None
        self.activeCommand: str | None = None  # "segment" or "finetune": what a "done" carries
        self.cancelDeadline: float | None = None
        self.starts = 0

    # ---- process ----------------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        # UTF-8 pipes and messages on Windows too (before Python 3.15 and Slicer 5.12 the worker's
        # stderr would be in the ANSI code page)
        env["PYTHONUTF8"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        env.update(self.extraEnv)
        return env

    def _ensureProcess(self) -> None:
        if self.worker is not None and self.worker.alive():
            return
        options: dict[str, Any]  # Popen's keyword arguments for this platform
        if sys.platform == "win32":
            options = {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            options = {"start_new_session": True}  # its own process group, killed as one
        command = self.command + ["-u", "-m", self.module]
        try:
            popen = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self._environment(), cwd=str(MODULE_DIR), text=True, encoding="utf-8",
                errors="replace", bufsize=1, **options)
        except OSError as error:  # FileNotFoundError, PermissionError, a bad executable format
            raise UNetSegError(
                f"Could not start the segmentation process ({self.command[0]}: {error.strerror or error}). "
                "Slicer's PythonSlicer (in Slicer's bin folder) was not found or cannot run; reinstall "
                "Slicer, or pass another Python to WorkerRunner(python=...).") from None
        self.starts += 1
        worker = self.worker = _Worker(popen, self.starts)
        threading.Thread(target=self._readStderr, args=(worker,), daemon=True).start()
        threading.Thread(target=self._readStdout, args=(worker,), daemon=True).start()

    def _readStdout(self, worker: _Worker) -> None:
        assert worker.popen.stdout is not None  # opened with stdout=PIPE
        for line in worker.popen.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                worker.stderrTail.append(line.rstrip())
                continue
            if isinstance(event, dict):
                self.events.put((worker, event))
        # Output closed: the whole tree has gone (a launcher's child shares the pipe). Reap it here, off
        # the GUI thread, and let the stderr reader finish so the message has the last lines.
        code = worker.popen.wait()
        worker.stderrDone.wait(timeout=2.0)
        self.events.put((worker, {"event": "_exited", "code": code}))

    @staticmethod
    def _readStderr(worker: _Worker) -> None:
        assert worker.popen.stderr is not None  # opened with stderr=PIPE
        try:
            for line in worker.popen.stderr:
                worker.stderrTail.append(line.rstrip())
        finally:
            worker.stderrDone.set()

    def _send(self, message: HelloRequest | QuitRequest | CancelRequest | SegmentRequest |
              FinetuneRequest) -> None:
        worker = self.worker
        if worker is None or worker.popen.stdin is None:
            return
        try:
            worker.popen.stdin.write(to_line(message))
            worker.popen.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the exit is noticed by the stdout reader and reported by poll()

    # ---- InferenceRunner --------------------------------------------------------------------------
    def start(self, request: dict[str, Any]) -> None:
        if self.activeId is not None:
            raise RuntimeError("A segmentation is already running; cancel it or wait for it to finish.")
        # checked before anything starts; a request may name another command (finetune)
        message = parse_request({"cmd": "segment", **request})
        if not isinstance(message, (SegmentRequest, FinetuneRequest)):
            raise ProtocolError(f"start() takes a segment or finetune request, not '{message.cmd}'.")
        self._ensureProcess()
        self.activeId, self.activeCommand = message.id, message.cmd
        self.cancelDeadline = None
        self._send(message)

    def requestInfo(self) -> None:
        self._ensureProcess()
        self._send(HelloRequest())

    def cancel(self) -> None:
        if self.activeId is None:
            return
        self._send(CancelRequest(id=self.activeId))
        if self.cancelDeadline is None:
            self.cancelDeadline = time.monotonic() + self.cancelGraceS

    def isBusy(self) -> bool:
        return self.activeId is not None

    def poll(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                worker, raw = self.events.get_nowait()
            except queue.Empty:
                break
            if worker is not self.worker:
                continue  # the last words of a worker that was stopped
            if raw.get("event") == "_exited":
                out.extend(self._onExit(worker, raw.get("code")))
                continue
            out.extend(self._onEvent(worker, raw))
        if self.activeId is not None and self.cancelDeadline is not None and \
                time.monotonic() > self.cancelDeadline:
            jobId = self.activeId
            self._kill()
            out.append(to_json(ErrorEvent(id=jobId, kind="cancelled",
                                          message="Segmentation was cancelled (the worker was stopped).")))
        return out

    def _onEvent(self, worker: _Worker, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """One event of the current worker, read into its protocol dataclass and handed on as JSON."""
        forActive = self.activeId is not None and str(raw.get("id")) == self.activeId
        try:
            event = parse_event(raw, answering=self.activeCommand if forActive else None)
        except ProtocolError as error:
            worker.stderrTail.append(f"unreadable event: {error}")
            if not forActive and raw.get("event") != "ready":
                return []  # nobody waits for it: kept in the log only
            return self._refuse(f"The segmentation process sent a message this module cannot read "
                                f"({error}). Is it another version of the extension? Restart Slicer; "
                                f"if it persists, reinstall the extension.")
        if isinstance(event, ReadyEvent):
            worker.pid = event.pid
            if event.protocol != PROTOCOL_VERSION:
                return self._refuse(f"The segmentation process speaks protocol {event.protocol}, this "
                                    f"module {PROTOCOL_VERSION}: they come from different versions of "
                                    "the extension. Restart Slicer; if it persists, reinstall it.")
        if isinstance(event, ErrorEvent) and event.id is None and self.activeId is not None:
            # the worker refused a line whose id it could not read: the one it was sent is the active one
            event = ErrorEvent(id=self.activeId, kind=event.kind, message=event.message,
                               traceback=event.traceback, details=event.details)
        if getattr(event, "event", None) in ("done", "error") and getattr(event, "id", None) == self.activeId:
            self.activeId, self.activeCommand, self.cancelDeadline = None, None, None
        return [to_json(event)]

    def _refuse(self, message: str) -> list[dict[str, Any]]:
        """Stop a worker that cannot be understood; the active request (if any) fails with ``message``."""
        jobId = self.activeId
        self._kill()
        if jobId is None:
            return []
        return [to_json(ErrorEvent(id=jobId, kind="internal", message=message))]

    def _onExit(self, worker: _Worker, code: int | None) -> list[dict[str, Any]]:
        self.worker = None
        if self.activeId is None:
            return []
        jobId, self.activeId, self.activeCommand = self.activeId, None, None
        if self.cancelDeadline is not None:
            self.cancelDeadline = None
            return [to_json(ErrorEvent(id=jobId, kind="cancelled", message="Segmentation was cancelled."))]
        lines = list(worker.stderrTail)
        launcherSawCrash = code == 1 and any(LAUNCHER_CRASH_TEXT in line for line in lines[-5:])
        hint = OUT_OF_MEMORY_HINT if code in KILLED_EXIT_CODES or launcherSawCrash else ""
        return [to_json(ErrorEvent(
            id=jobId, kind="crashed",
            message=f"The segmentation process stopped unexpectedly (exit code {code}).{hint} "
                    f"Slicer and the scene are unaffected; press Segment to try again.",
            details="\n".join(lines[-8:])))]

    def _kill(self) -> None:
        """Stop the current worker tree at once, without waiting (its reader thread reaps it)."""
        worker, self.worker = self.worker, None
        self.activeId, self.activeCommand, self.cancelDeadline = None, None, None
        if worker is None:
            return
        try:
            if worker.popen.stdin is not None:
                worker.popen.stdin.close()
        except (OSError, ValueError):
            pass
        killProcessTree(worker.popen)

    def shutdown(self) -> None:
        worker = self.worker
        if worker is None:
            return
        self._send(QuitRequest())
        try:
            if worker.popen.stdin is not None:
                worker.popen.stdin.close()  # end of input: the worker exits, its children with it
        except (OSError, ValueError):
            pass
        try:
            worker.popen.wait(timeout=2)  # bounded: called when the module is cleaned up
        except subprocess.TimeoutExpired:
            pass
        self._kill()

    @property
    def pid(self) -> int | None:
        """The started process (in Slicer: the launcher)."""
        return self.worker.popen.pid if self.worker is not None and self.worker.alive() else None

    @property
    def workerPid(self) -> int | None:
        """The engine's own process, as it reported itself (in Slicer: python-real, the launcher's child)."""
        return self.worker.pid if self.worker is not None else None
