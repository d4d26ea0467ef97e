"""``unetseg batch --cluster tcp://HOST:PORT``: the same batch, its studies spread over the workers of
a running Dask cluster (``pip install ".[cluster]"``; ``dask scheduler``, ``dask worker``).

Everything a study does is ``batch.BatchRunner.run_scan``, run on a worker: the same result, log and
completed marker, written atomically in the same folders, so a cluster run and a local one resume
each other. The client does what the local batch does around it (``done_before``, ``start``,
``finish``): studies done before are skipped before anything is submitted, each record is gathered
into the same ``summary.csv`` as its future completes, with the same progress line and an ETA.

Each worker process loads the model once (``_warm_runner``: one predictor per model and settings,
kept in this module while the process lives, the last ``WARM_MODELS`` of them) and keeps it for
every study it is given, in this batch and the next. The workers must see the client's paths (a
shared filesystem): before submitting, one worker checks that it can read the input root, the model
package and the first scan, and write the output root.

A worker that dies mid-study: the scheduler gives the study to another worker, as often as its
``distributed.scheduler.allowed-failures`` says (3 by default); a study that keeps killing workers
is then reported failed ("a worker died running it"), never dropped. Ctrl-C cancels every study not
started; those already running finish on their workers (results are renamed into place whole, so
there is never a half-written one) and a later run skips them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .batch import BatchRunner, Scan
from .errors import UNetSegError

CONNECT_TIMEOUT_S = 5.0
WARM_MODELS = 2  # predictors a worker keeps (model and settings); the oldest goes when another comes
CHECK_TIMEOUT_S = 120.0  # a fresh worker imports the engine (PyTorch, MONAI) for the check

# On a worker: the warm predictors of this process, and how often each was loaded (the tests read it)
_WARM: dict[tuple, tuple[Any, Any, threading.Lock, float]] = {}
MODEL_LOADS: dict[str, int] = {}
_WARM_LOCK = threading.Lock()


def _knob_key(knobs: dict) -> tuple:
    return tuple(sorted(knobs.items()))


def _warm_runner(job: dict) -> tuple[BatchRunner, threading.Lock, str]:
    """This worker's runner for ``job``, with its model loaded once per process; and a log note."""
    from .modelpkg import load_package
    from .pipeline import load_predictor

    key = (job["model_path"], job["weights"], _knob_key(job["knobs"]))
    with _WARM_LOCK:  # a worker with several threads loads a model once, too
        if key not in _WARM:
            package = load_package(job["model_path"])
            if package.weights_key != job["weights"]:
                raise UNetSegError(f"The model package '{job['model_path']}' seen by this worker has "
                                   "other weights than the client's; the cluster must share the "
                                   "client's files.")
            while len(_WARM) >= WARM_MODELS:  # a study still using it keeps its own reference
                del _WARM[next(iter(_WARM))]
            _WARM[key] = (package, load_predictor(package, **job["knobs"]), threading.Lock(), time.time())
            MODEL_LOADS[job["weights"]] = MODEL_LOADS.get(job["weights"], 0) + 1
            how = "model loaded for this study"
        else:
            how = f"model warm (loaded {time.time() - _WARM[key][3]:.1f} s ago)"
    package, predictor, lock, _ = _WARM[key]
    runner = BatchRunner(package, job["output_root"], job["output_type"], window=job["window"],
                         quiet=True, predictor=predictor)
    return runner, lock, how


def run_scan_on_worker(job: dict, scan: Scan) -> tuple[dict, dict]:
    """The task: one study with this worker's warm model. Returns (record, where it ran)."""
    from distributed import get_worker

    address = get_worker().address
    runner, lock, how = _warm_runner(job)
    with lock:  # one study at a time per predictor, whatever the worker's thread count
        record = runner.run_scan(scan, note=f"on Dask worker {address} (pid {os.getpid()}): {how}")
    return record, {"worker": address, "pid": os.getpid(), "model_loads": MODEL_LOADS[job["weights"]]}


def check_worker(input_root: str, output_root: str, model_path: str, first_scan: str) -> list[str]:
    """On a worker: what it cannot see of the client's paths (empty: all well)."""
    problems = []
    for what, path in (("the input root", input_root), ("the model package", model_path)):
        try:
            os.listdir(path)
        except OSError as error:
            problems.append(f"cannot read {what} '{path}' ({error.strerror or error})")
    if not problems and not os.access(first_scan, os.R_OK):
        problems.append(f"cannot read the scan '{first_scan}'")
    try:
        probe = Path(output_root) / f".unetseg-probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        problems.append(f"cannot write in the output root '{output_root}' ({error.strerror or error})")
    return problems


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S):
    """A client of the Dask scheduler at ``address``, or one clear error within ``timeout`` seconds."""
    try:
        from distributed import Client
    except ImportError:
        raise UNetSegError("--cluster needs Dask distributed, which is not installed: "
                           "pip install \"slicerunetseg[cluster]\" (or \"dask[distributed]\").") from None
    from distributed.comm.addressing import parse_address, parse_host_port

    try:  # checked here: Client() refuses a bad address only after a 10 s wait in its clean-up
        scheme, location = parse_address(address)
        parse_host_port(location)
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"unknown scheme '{scheme}'")
    except ValueError as error:
        raise UNetSegError(f"'{address}' is not a Dask scheduler address ({error}); give "
                           "tcp://HOST:PORT, as 'dask scheduler' prints it.") from None
    # our own lines say what went wrong (a lost scheduler fails each study left), not its tracebacks
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise UNetSegError(f"Cannot reach the Dask scheduler at '{address}' ({error}). Start one "
                           "('dask scheduler') and give the address it prints, e.g. "
                           "tcp://HOST:8786.") from None


def check_cluster(client, address: str, scans: list[Scan], job: dict, input_root: Path,
                  wait_s: float = 10.0) -> str:
    """Refuse a cluster with no worker, or whose first worker cannot see our files; its address."""
    try:
        client.wait_for_workers(1, timeout=wait_s)
    except TimeoutError:
        raise UNetSegError(f"The Dask scheduler at '{address}' has no worker; start some with "
                           f"'dask worker {address}'.") from None
    worker = sorted(client.scheduler_info()["workers"])[0]
    future = client.submit(check_worker, str(input_root), job["output_root"], job["model_path"],
                           str(scans[0].path if scans[0].series is None else scans[0].series.files[0]),
                           workers=[worker], pure=False)
    try:
        problems = future.result(timeout=CHECK_TIMEOUT_S)
    except TimeoutError:
        raise UNetSegError(f"Worker {worker} did not answer a file check within {CHECK_TIMEOUT_S:.0f} s."
                           ) from None
    except Exception as error:  # e.g. the worker cannot import the engine
        raise UNetSegError(f"Worker {worker} could not run the engine ({type(error).__name__}: {error}); "
                           "install slicerunetseg on the workers, as on this machine.") from None
    if problems:
        raise UNetSegError(f"Worker {worker} {'; '.join(problems)}. The cluster's workers must see "
                           "the same paths as this machine (a shared filesystem).")
    return worker


def run_on_cluster(runner: BatchRunner, scans: list[Scan], client, address: str, input_root: Path,
                   knobs: dict) -> list[dict]:
    """``runner.run(scans)``, each study on a worker of the cluster ``client`` is connected to (at
    ``address``; the caller closes it)."""
    from distributed import as_completed

    done = runner.done_before(scans)  # skipped before anything is submitted
    todo = [s for s in scans if s.key not in done]
    job = {"model_path": str(runner.package.path.resolve()), "weights": runner.package.weights_key,
           "knobs": knobs, "output_root": str(runner.output_root.resolve()),
           "output_type": runner.output_type, "window": runner.window}
    futures: dict = {}
    try:
        if todo:
            worker = check_cluster(client, address, todo, job, input_root)
            if not runner.quiet:
                count = len(client.scheduler_info()["workers"])
                print(f"cluster {address}: {count} worker(s); {worker} sees this machine's files",
                      file=runner.stream, flush=True)
        progress = runner.start(scans, done, parallel=True)
        for scan in scans:
            if scan.key in done:
                runner.finish(scan, {**done[scan.key], "status": "done before"}, progress)
        by_key = {s.key: s for s in todo}
        futures = {client.submit(run_scan_on_worker, job, scan, pure=False,
                                 key=f"unetseg-study-{index}-{os.getpid()}-{time.time_ns()}"): scan.key
                   for index, scan in enumerate(todo)}
        for future in as_completed(futures, loop=client.loop):
            scan = by_key[futures[future]]
            record, where = _outcome(future, scan, runner)
            runner.finish(scan, record, progress, where)
    except KeyboardInterrupt:
        client.cancel(list(futures))  # not started: dropped; running: finish whole on their worker
        raise
    return [runner.records[s.key] for s in scans]


def _outcome(future, scan: Scan, runner: BatchRunner) -> tuple[dict, str]:
    """The record a finished future holds, or a failed one saying why there is none."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker

    try:
        record, info = future.result()
        return record, f" on {info['worker']}"
    except CancelledError:  # what Dask says of every future when the scheduler is gone
        message = "not finished: the connection to the Dask scheduler was lost; run the same " \
                  "command again to go on"
    except KilledWorker as error:
        last, tries = getattr(error.last_worker, "address", error.last_worker), error.allowed_failures + 1
        message = f"a worker died running it, on each of {tries} tries (the last: {last})"
    except Exception as error:  # raised before the study (e.g. the worker's model would not load)
        message = f"{type(error).__name__}: {error}"
    record = {"study": scan.study, "series": scan.series_uid, "modality": scan.modality,
              "output": runner.output_name, "model": runner.package.id,
              "weights": runner.package.weights_key, "status": "failed", "message": message,
              "time_s": 0.0}
    return record, ""


def worker_state() -> dict:
    """On a worker (``client.run(worker_state)``): its process and the models it loaded, how often."""
    return {"pid": os.getpid(), "model_loads": dict(MODEL_LOADS), "warm": len(_WARM)}
