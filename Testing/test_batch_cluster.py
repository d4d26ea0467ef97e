"""``unetseg batch --cluster``: a Dask LocalCluster of 2 worker processes started here, the same
inputs run locally and on it: identical labels, the same summary rows, resume, a failing study, the
model loaded once per worker, and the refusals (unreachable scheduler, a worker that cannot see the
files)."""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from helpers import REPO, make_package, openkbp, tiny_meta, write_ct_series
from unetseg_engine.cli import main

distributed = pytest.importorskip(
    "distributed", reason="Dask distributed is not installed (pip install '.[cluster]'), which "
    "'unetseg batch --cluster' needs; the cluster batch is not tested")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The tiny model test_batch.py uses: a random 3-class network that finds labels 1 and 2."""
    return make_package(tmp_path_factory.mktemp("models") / "tiny-cluster", tiny_meta("tiny-cluster"),
                        bias={1: 2.0, 2: 1.0})


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Crops of two real OpenKBP CTs as NIfTI and NRRD, one as a DICOM series, and a broken scan."""
    root = tmp_path_factory.mktemp("cluster") / "in"
    ct201 = sitk.ReadImage(str(openkbp("pt_201")[0]))
    ct236 = sitk.ReadImage(str(openkbp("pt_236")[0]))
    (root / "patient1").mkdir(parents=True)
    sitk.WriteImage(ct201[:, :, 40:80], str(root / "patient1" / "ct.nii.gz"))
    (root / "patient3").mkdir()
    sitk.WriteImage(ct236[:, :, 30:70], str(root / "patient3" / "ct.nrrd"))
    write_ct_series(ct201[:, :, 50:90], root / "patient2" / "dicom")
    (root / "broken").mkdir()
    (root / "broken" / "scan.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """2 worker processes of 1 thread on loopback; closed (no process left) after the module."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "SlicerUNetSeg"),
                                                     os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1", "UNETSEG_CACHE": str(tmp_path_factory.mktemp("worker-cache"))}
    # allowed_failures=1: a study whose worker dies is given to another worker once (Dask's default
    # is 3 times), so the test of a dying worker kills two, not four
    local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                     dashboard_address=":0", memory_limit="4GiB", env=env,
                                     silence_logs=logging.ERROR,
                                     scheduler_kwargs={"allowed_failures": 1})
    client = distributed.Client(local, set_as_default=False)
    try:
        client.wait_for_workers(2, timeout=120)
        yield local, client
    finally:
        client.close()
        local.close()


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tree, package, cluster, tmp_path_factory):
    """The same batch locally and on the cluster: (local output, cluster output, cluster stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("outputs")
    # one runtime: auto measures per machine and thread count, and might pick another on the workers
    model = ["--model", str(package.path), "--device", "cpu", "--runtime", "torch"]
    assert main(["batch", str(tree), "-o", str(out / "local"), *model, "-q"]) == 1
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        status = main(["batch", str(tree), "-o", str(out / "cluster"), *model,
                       "--cluster", cluster[0].scheduler_address])
    print(f"cluster batch of 4 studies: {time.perf_counter() - t0:.1f} s")
    assert status == 1, err.getvalue()  # the broken study failed, the batch went on
    return out / "local", out / "cluster", err.getvalue()


def _labels(path: Path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_cluster_labels_equal_the_local_batch_voxel_for_voxel(runs):
    local, remote, _ = runs
    results = sorted(p.relative_to(local) for p in local.rglob("segmentation.seg.nrrd"))
    assert len(results) == 3  # the broken one has none
    assert sorted(p.relative_to(remote) for p in remote.rglob("segmentation.seg.nrrd")) == results
    for rel in results:
        a, b = _labels(local / rel), _labels(remote / rel)
        assert a.shape == b.shape and (a == b).all(), rel
        assert (a > 0).sum() > 1000, rel  # real masks, not two empty images
        assert (remote / rel.parent / "segmentation.seg.nrrd.done.json").is_file()


def test_cluster_summary_rows_are_the_local_ones(runs, package):
    local, remote, err = runs
    same = ["study", "series", "modality", "status", "output", "message"] + \
        [f"{name}_ml" for name in package.label_names]
    local_rows, remote_rows = read_csv(local / "summary.csv"), read_csv(remote / "summary.csv")
    assert [{k: r[k] for k in same} for r in remote_rows] == [{k: r[k] for k in same} for r in local_rows]
    status = {r["study"]: r["status"] for r in remote_rows}
    assert status == {"broken/scan.nrrd": "failed", "patient1/ct.nii.gz": "done",
                      "patient2/dicom": "done", "patient3/ct.nrrd": "done"}
    assert "Could not read" in next(r for r in remote_rows if r["status"] == "failed")["message"]
    assert all(float(r["time_s"]) > 0 for r in remote_rows)
    assert "error: Could not read" in (remote / "broken" / "scan" / "log.txt").read_text()
    assert "cluster tcp://127.0.0.1:" in err and "2 worker(s)" in err
    assert "[4/4]" in err and "ETA" in err and " on tcp://127.0.0.1:" in err


def test_each_worker_loads_the_model_once_for_all_its_studies(runs, cluster):
    from unetseg_engine.cluster import worker_state

    _, remote, _ = runs
    logs = [p.read_text() for p in remote.rglob("log.txt")]
    assert len(logs) == 4
    workers = [line.split("on Dask worker ")[1].split()[0] for log in logs for line in log.splitlines()
               if "on Dask worker " in line]
    loaded = [log for log in logs if "model loaded for this study" in log]
    assert len(workers) == 4 and len(loaded) == len(set(workers))  # once per worker that ran any
    assert len(logs) - len(loaded) >= 2  # 4 studies on 2 workers: at least 2 found the model warm
    state = cluster[1].run(worker_state)  # what each worker process counted itself
    used = {address: s for address, s in state.items() if address in workers}
    assert used and all(list(s["model_loads"].values()) == [1] for s in used.values()), state


def test_cluster_resume_skips_done_studies_before_submitting(runs, tree, package, cluster, capsys):
    _, remote, _ = runs
    markers = sorted(remote.rglob("*.done.json"))
    before = {p: p.stat().st_mtime_ns for p in markers}
    redo = next(p for p in markers if "patient3" in str(p))
    redo.unlink()  # as if the run had stopped after the result, before the marker
    status = main(["batch", str(tree), "-o", str(remote), "--model", str(package.path), "--device", "cpu",
                   "--runtime", "torch", "--cluster", cluster[0].scheduler_address])
    err = capsys.readouterr().err
    assert status == 1
    assert "patient1/ct: done before, skipped" in err and "patient2/dicom/" in err
    assert err.count("done before, skipped") == 2
    for marker, mtime in before.items():
        if marker != redo:
            assert marker.stat().st_mtime_ns == mtime, marker  # not redone
    assert redo.is_file()  # redone on the cluster
    rows = {r["study"]: r["status"] for r in read_csv(remote / "summary.csv")}
    assert rows == {"broken/scan.nrrd": "failed", "patient1/ct.nii.gz": "done before",
                    "patient2/dicom": "done before", "patient3/ct.nrrd": "done"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_scheduler_is_one_clear_line_within_seconds(tree, package, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    status = main(["batch", str(tree), "-o", str(tmp_path / "out"), "--model", str(package.path),
                   "--cluster", address, "-q"])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("unetseg: error: Cannot reach the Dask scheduler at") and address in err[0]
    assert took < 15, took
    assert not (tmp_path / "out").exists()  # nothing made


@pytest.mark.parametrize("address, words", [("ray://127.0.0.1:8786", "unknown scheme 'ray'"),
                                            ("tcp://127.0.0.1", "missing port")])
def test_a_malformed_address_is_refused_at_once(address, words, tree, package, tmp_path, capsys):
    t0 = time.perf_counter()
    status = main(["batch", str(tree), "-o", str(tmp_path / "out"), "--model", str(package.path),
                   "--cluster", address, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert f"'{address}' is not a Dask scheduler address" in err[0] and words in err[0], err[0]
    assert time.perf_counter() - t0 < 5


def test_a_worker_that_cannot_see_the_input_root_is_refused_before_any_study(tree, package, cluster,
                                                                             tmp_path):
    """The client's own check passes (the folder is here); the worker's path is one it lacks."""
    from unetseg_engine.batch import find_scans
    from unetseg_engine.cluster import check_cluster
    from unetseg_engine.errors import UNetSegError

    scans, _ = find_scans(tree)
    job = {"output_root": str(tmp_path), "model_path": str(package.path)}
    with pytest.raises(UNetSegError, match="cannot read the input root '/nonexistent/in'.*shared filesystem"):
        check_cluster(cluster[1], "local", scans, job, Path("/nonexistent/in"))
    assert check_cluster(cluster[1], "local", scans, job, tree) in cluster[1].scheduler_info()["workers"]


def _slow_studies(root: Path, count: int) -> list[str]:
    """``count`` crops of a real CT that take seconds each with ``SLOW`` (many overlapping windows)."""
    ct = sitk.ReadImage(str(openkbp("pt_201")[0]))[:, :, 40:64]
    root.mkdir(parents=True)
    for i in range(count):
        sitk.WriteImage(ct, str(root / f"slow{i}.nrrd"))
    return [f"slow{i}" for i in range(count)]


SLOW = ["--overlap", "0.95", "--runtime", "torch"]


def _pid_running(log: Path) -> int | None:
    """The worker process of a study whose log says it is in the network's inference."""
    try:
        text = log.read_text()
    except OSError:
        return None
    found = re.search(r"on Dask worker \S+ \(pid (\d+)\)", text)
    return int(found[1]) if found and "inference" in text else None


def test_ctrl_c_cancels_the_studies_not_started_and_leaves_no_half_written_file(package, cluster, tmp_path,
                                                                               capsys):
    """Ctrl-C (SIGINT to this process, as a terminal sends it) while the first 2 of 6 studies run:
    ``batch`` stops at once (130); the 4 not started never start; the 2 running finish whole on their
    workers (result and marker), or leave nothing."""
    names = _slow_studies(tmp_path / "in", 6)
    out, sent, returned = tmp_path / "out", [], threading.Event()

    def interrupt_while_running():
        deadline = time.monotonic() + 120
        while not returned.is_set() and time.monotonic() < deadline:
            if any(_pid_running(out / n / "log.txt") for n in names[:2]):
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ran before
    threading.Thread(target=interrupt_while_running, daemon=True).start()
    try:
        status = main(["batch", str(tmp_path / "in"), "-o", str(out), "--model", str(package.path),
                       "--device", "cpu", *SLOW, "--cluster", cluster[0].scheduler_address, "-q"])
    finally:
        returned.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # main() leaves Ctrl-C ignored
    err = capsys.readouterr().err
    assert sent and status == 130, err
    assert time.monotonic() - sent[0] < 15
    assert "unetseg: interrupted; the studies finished so far are kept" in err
    deadline = time.monotonic() + 60  # the running ones finish on their workers
    logs = [out / n / "log.txt" for n in names]
    while time.monotonic() < deadline and any(
            log.exists() and " in " not in log.read_text().splitlines()[-1] for log in logs):
        time.sleep(0.2)
    time.sleep(1)  # nothing cancelled starts late
    started = [n for n in names if (out / n / "log.txt").exists()]
    assert 1 <= len(started) <= 2, started  # 2 workers of 1 thread: the rest were cancelled
    for name in names:
        files = sorted(p.name for p in (out / name).iterdir()) if (out / name).exists() else []
        assert files in ([], ["log.txt", "segmentation.seg.nrrd", "segmentation.seg.nrrd.done.json"]), files


# last in this module: its killed workers are still restarting when the cluster is closed
def test_a_worker_dying_mid_study_is_retried_then_the_study_reported_failed(package, cluster, tmp_path,
                                                                           capsys):
    """Kill (SIGKILL) the worker running the study, then the one running its retry: the scheduler
    retried it once on another worker (allowed_failures=1 here), then the batch reports it failed
    and ends; no result and no marker under the study's name."""
    _slow_studies(tmp_path / "in", 1)
    log, killed = tmp_path / "out" / "slow0" / "log.txt", []

    def kill_twice():
        deadline = time.monotonic() + 120
        while len(killed) < 2 and time.monotonic() < deadline:
            pid = _pid_running(log)
            if pid is not None and pid not in killed:
                os.kill(pid, signal.SIGKILL)  # a worker process the cluster fixture started
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_twice, daemon=True)
    killer.start()
    status = main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(package.path),
                   "--device", "cpu", *SLOW, "--cluster", cluster[0].scheduler_address])
    killer.join(5)
    err = capsys.readouterr().err
    assert len(killed) == 2 and killed[0] != killed[1], (killed, err)  # the retry ran in another process
    assert status == 1, err
    [row] = read_csv(tmp_path / "out" / "summary.csv")
    assert row["status"] == "failed", row
    assert "a worker died running it, on each of 2 tries" in row["message"], row
    assert "slow0: failed" in err
    assert not (tmp_path / "out" / "slow0" / "segmentation.seg.nrrd").exists()
    assert not (tmp_path / "out" / "slow0" / "segmentation.seg.nrrd.done.json").exists()
