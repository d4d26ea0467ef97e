"""The worker runner around misbehaving workers, started as in Slicer: through a launcher
(``fakeLauncher.py``, standing in for PythonSlicer) that runs the worker as its child process."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from SlicerUNetSegLib import workerRunner
from SlicerUNetSegLib.workerRunner import MODULE_DIR, WorkerRunner
from unetseg_engine.errors import UNetSegError

HERE = Path(__file__).resolve().parent
LAUNCHER = [sys.executable, str(HERE / "fakeLauncher.py")]


def scriptedRunner(behaviour: str = "hang", **options) -> WorkerRunner:
    env = {"PYTHONPATH": os.pathsep.join([str(MODULE_DIR), str(HERE)]), "UNETSEG_TEST_WORKER": behaviour}
    return WorkerRunner(python=LAUNCHER, module="scriptedWorker", env=env, **options)


def segmentRequest(jobId: str = "job") -> dict:
    """A well-formed segment request (these workers never read its files)."""
    return {"id": jobId, "inputs": [{"path": "input.nrrd"}], "output_dir": "out"}


def pollUntil(runner, condition, timeout=20.0, events=None):
    """Poll as the panel's timer does; every poll() must return at once (it runs on the GUI thread)."""
    start = time.monotonic()
    while True:
        t = time.monotonic()
        got = runner.poll()
        assert time.monotonic() - t < 0.5, "poll() blocked the GUI thread"
        if events is not None:
            events.extend(got)
        if condition():
            return
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def waitGone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_cancel_kills_the_whole_tree_of_a_worker_that_ignores_it():
    runner = scriptedRunner(cancelGraceS=0.3)
    try:
        runner.start(segmentRequest("job1"))
        pollUntil(runner, lambda: runner.workerPid is not None)
        launcher, worker = runner.pid, runner.workerPid
        assert launcher != worker and psutil.Process(worker).ppid() == launcher  # a real tree
        runner.cancel()
        events = []
        pollUntil(runner, lambda: not runner.isBusy(), events=events)
        assert [e["kind"] for e in events if e.get("event") == "error"] == ["cancelled"]
        assert waitGone(worker), "the launcher's child (python-real in Slicer) survived the cancel"
        assert waitGone(launcher)
    finally:
        runner.shutdown()


def test_next_segment_after_a_killed_worker_starts_a_fresh_one_and_poll_never_blocks(monkeypatch):
    """The killed worker's end arrives after the next worker has started; it must not be taken for the
    new worker's. CPython reuses a freed object's address, so id() of the old and the new Popen are
    often equal in Slicer (the old code compared them, then blocked in process.wait() on the GUI
    thread); reuse cannot be provoked on demand, so id() is made to collide always here."""
    monkeypatch.setattr(workerRunner, "id", lambda obj: 0, raising=False)
    runner = scriptedRunner(cancelGraceS=0.2)
    done = threading.Event()
    failures = []

    def scenario():
        try:
            for round_ in range(4):
                runner.start(segmentRequest(f"job{round_}"))
                pollUntil(runner, lambda: runner.workerPid is not None)
                old = runner.workerPid
                runner.cancel()
                pollUntil(runner, lambda: not runner.isBusy())
                assert waitGone(old)
                time.sleep(0.3)  # the old worker's reader thread reports its end and finishes
                gc.collect()  # and its Popen is freed
                runner.start(segmentRequest(f"next{round_}"))
                pollUntil(runner, lambda: runner.workerPid is not None)
                for _ in range(10):  # the old worker's end is in the queue now: ignored
                    pollUntil(runner, lambda: True)
                    time.sleep(0.02)
                assert runner.isBusy() and runner.workerPid != old
                runner.cancel()
                pollUntil(runner, lambda: not runner.isBusy())
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            failures.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=scenario, daemon=True)
    thread.start()
    try:
        assert done.wait(60), "the runner hung (poll() blocked)"
        if failures:
            raise failures[0]
    finally:
        runner._kill()
    assert runner.starts == 8  # one fresh worker per start: every killed one was replaced


def test_worker_stderr_in_another_encoding_is_read_and_the_worker_gets_utf8():
    runner = scriptedRunner("bad-stderr")
    try:
        runner.requestInfo()
        events = []
        pollUntil(runner, lambda: any(e.get("event") == "hello" for e in events), events=events)
        assert [e for e in events if e.get("event") == "hello"][0]["utf8_mode"] is True
        runner.start(segmentRequest())
        events = []
        pollUntil(runner, lambda: not runner.isBusy(), events=events)
        error = [e for e in events if e.get("event") == "error"][0]
        assert error["kind"] == "crashed" and "exit code 3" in error["message"]
        assert "M\ufffdmoire insuffisante" in error["details"]  # replaced, not a dead reader thread
    finally:
        runner.shutdown()


def test_a_missing_worker_python_is_reported_with_the_modules_message():
    runner = WorkerRunner(python=str(HERE / "no-such-python"))
    with pytest.raises(UNetSegError, match="Could not start the segmentation process"):
        runner.start(segmentRequest())
    assert not runner.isBusy()
    with pytest.raises(UNetSegError, match="PythonSlicer"):
        runner.requestInfo()
