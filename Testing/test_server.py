"""``unetseg serve`` as a real subprocess on loopback: many clients at once, identical results, refusals
that leave nothing behind, cancel, and a server killed mid-job (jobs resumed on restart).

The scans are small crops of a real OpenKBP CT, each a different size, so a result handed to the wrong
client cannot match; the models are tiny real networks (quality does not matter here, identity does).
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import ServerProcess as Server
from helpers import make_package, openkbp, tiny_meta, write_ct_series
from unetseg_engine.errors import CancelledError
from unetseg_engine.pipeline import segment_files
from unetseg_engine.server.client import ServerClient, ServerError

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (pip install '.[server]')")

TOKEN = "test-token-" + "k" * 32
MAX_UPLOAD_MB = 3.0  # ServerProcess's limit
N_CLIENTS, SCANS_PER_CLIENT = 8, 4


def leftovers(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file())


def until(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def seg_voxels(path: Path):
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    return seg["voxels"], np.array(seg["ijkToLPS"]), [s["name"] for s in seg["segments"]]


def assert_same_result(got: Path, expected: Path) -> None:
    voxels, ijk, names = seg_voxels(got)
    ref_voxels, ref_ijk, ref_names = seg_voxels(expected)
    assert names == ref_names
    np.testing.assert_allclose(ijk, ref_ijk, atol=1e-6)
    assert voxels.shape == ref_voxels.shape and np.array_equal(voxels, ref_voxels)


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fast tiny model, and a slower one (fine grid, more windows) to catch runs in the middle."""
    root = tmp_path_factory.mktemp("server-models")
    fast = make_package(root / "tiny-serve", tiny_meta("tiny-serve"), bias={1: 2.0, 2: 1.0})
    meta = tiny_meta("tiny-slow")
    # slow enough on an idle machine too (at 3 mm and overlap 0.5 a quiet CI machine finished the job
    # between two status polls): 1.5 mm and overlap 0.75, about 64 times the fast model's windows
    meta["preprocessing"]["spacing_mm"] = [1.5, 1.5, 1.5]
    meta["inference"]["overlap"] = 0.75
    slow = make_package(root / "tiny-slow", meta, bias={1: 2.0, 2: 1.0})
    return fast, slow


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """32 different crops of a real CT: NIfTI, NRRD and DICOM series folders."""
    ct = sitk.ReadImage(str(openkbp("pt_201")[0]))
    root = tmp_path_factory.mktemp("scans")
    out = []
    for i in range(N_CLIENTS * SCANS_PER_CLIENT):
        crop = ct[20:80 + i, 24:96, 40 + i % 5:64 + i % 5]  # a different x size each: no two alike
        if i % 4 == 0:
            write_ct_series(crop, root / f"scan{i:02d}")
            out.append(root / f"scan{i:02d}")
        else:
            path = root / f"scan{i:02d}.{'nrrd' if i % 4 == 1 else 'nii.gz'}"
            sitk.WriteImage(crop, str(path))
            out.append(path)
    return out


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "token.txt"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, models, token_file):
    state = tmp_path_factory.mktemp("server-state")
    running = Server(state, token_file, list(p.path for p in models))
    running.state = state
    yield running
    running.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it (exit status -15)
    assert running.popen.returncode in (0, -signal.SIGTERM), "".join(running.log)
    assert "Traceback" not in "".join(running.log)
    assert TOKEN not in "".join(running.log)


def local_result(scan: Path, model, out: Path) -> Path:
    segment_files([str(scan)], str(out), model=str(model.path), runtime="torch", device="cpu", quiet=True)
    return out


# ---- tests ------------------------------------------------------------------------------------------
def test_eight_clients_four_scans_each_get_their_own_results_identical_to_a_local_run(
        server, models, scans, tmp_path):
    fast = models[0]
    batches = [scans[c * SCANS_PER_CLIENT:(c + 1) * SCANS_PER_CLIENT] for c in range(N_CLIENTS)]
    out = tmp_path / "server"
    out.mkdir()

    def one_client(index: int) -> list[tuple[Path, Path, str]]:
        client = ServerClient(server.url, TOKEN)
        jobs = [(scan, client.submit(scan, fast.id)["id"]) for scan in batches[index]]  # all 4 at once
        got = []
        for scan, job_id in jobs:
            client.wait(job_id)
            got.append((scan, client.download(job_id, out / f"{scan.name.split('.')[0]}.seg.nrrd"), job_id))
        return got

    start = time.perf_counter()
    with ThreadPoolExecutor(N_CLIENTS) as pool:
        results = [r for batch in pool.map(one_client, range(N_CLIENTS)) for r in batch]
    elapsed = time.perf_counter() - start
    assert len(results) == len(scans) and len({job for _, _, job in results}) == len(scans)
    for scan, got, _ in results:
        assert_same_result(got, local_result(scan, fast, tmp_path / f"local-{scan.name}.seg.nrrd"))
    print(f"{len(results)} jobs from {N_CLIENTS} clients in {elapsed:.1f} s, all identical to local runs")
    client = ServerClient(server.url, TOKEN)
    until(lambda: not client.jobs() and not leftovers(server.state), what="downloaded jobs to be deleted")


def _raw_upload(port: int, headers: dict[str, str], body: bytes = b"", query: str = "") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", f"/jobs?{query}", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_refused_requests_leave_nothing_and_the_server_keeps_serving(server, models, scans, tmp_path):
    fast = models[0]
    query = f"model={fast.id}&filename=ct.nii.gz"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a scan at all" * 100)
    fake_zip = tmp_path / "series.zip"
    fake_zip.write_bytes(b"PK\x03\x04 not really a zip")
    cases = [
        ({}, b"x", query, 401, "token"),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, b"x", query, 401, "token"),
        ({"Authorization": TOKEN}, b"x", query, 401, "token"),  # no scheme
        (auth, b"x", "model=no-such-model&filename=ct.nii.gz", 404, "not served here"),
        (auth, b"x", f"model={fast.id}&filename=ct.jpg", 415, "Unsupported upload"),
        (auth, b"x", f"model={fast.id}&filename=ct.nii.gz&output=pdf", 400, "Unknown output"),
        (auth, b"", query, 400, "empty"),
        (auth, junk.read_bytes(), query, 400, "Could not read the upload"),
        (auth, fake_zip.read_bytes(), f"model={fast.id}&filename=series.zip", 400, "not a readable zip"),
        (auth, scans[1].read_bytes(), f"model={fast.id}&filename=ct.nrrd&output=dicom-seg", 400,
         "needs a DICOM series"),
    ]
    for headers, body, q, status, words in cases:
        got, text = _raw_upload(server.port, headers, body, q)
        assert (got, words in text) == (status, True), (q, got, text)
        assert TOKEN not in text
        assert leftovers(server.state) == [], (q, leftovers(server.state))
    # oversized, told by Content-Length: refused before the body is read
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", f"/jobs?{query}")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Content-Length", str(int(MAX_UPLOAD_MB * 1e6) + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in response.read().decode()
    connection.close()
    # oversized and streamed without a length: cut off at the limit, the partial file removed
    chunks = (b"\0" * 65536 for _ in range(int(MAX_UPLOAD_MB * 1e6 / 65536) + 20))
    try:
        status, text = _raw_upload(server.port, {**auth, "Transfer-Encoding": "chunked"}, chunks, query)
        assert status == 413 and "limit" in text
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed while we were still sending
    until(lambda: leftovers(server.state) == [], what="the partial upload to be removed")
    with pytest.raises(ServerError, match="Cannot reach"):
        ServerClient("http://127.0.0.1:9", TOKEN).models()
    # still serving
    client = ServerClient(server.url, TOKEN)
    job = client.submit(scans[2], fast.id, output="nii.gz")
    assert client.wait(job["id"])["status"] == "done"
    result = client.download(job["id"], tmp_path / "after.nii.gz")
    assert sitk.ReadImage(str(result)).GetSize() == sitk.ReadImage(str(scans[2])).GetSize()


UPLOAD_AND_VANISH = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(("POST /jobs?model=%s&filename=ct.nii.gz HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer %s\\r\\n"
           "Content-Length: 2500000\\r\\n\\r\\n" % (sys.argv[2], sys.argv[3])).encode())
s.sendall(b"\\0" * 1000000)
print("sent", flush=True)
time.sleep(60)
"""


def test_a_client_killed_mid_upload_leaves_no_job_and_no_file(server, models):
    fast = models[0]
    client = subprocess.Popen([sys.executable, "-c", UPLOAD_AND_VANISH, str(server.port), fast.id, TOKEN],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "sent"
        uploads = server.state / "uploads"
        until(lambda: any(p.stat().st_size > 0 for p in uploads.glob("*.part")), what="a partial upload")
    finally:
        client.kill()
        client.wait()
    until(lambda: leftovers(server.state) == [], what="the partial upload to be removed")
    assert ServerClient(server.url, TOKEN).jobs() == []


def test_progress_and_cancel_of_a_running_job(server, models, scans):
    slow = models[1]
    client = ServerClient(server.url, TOKEN)
    job = client.submit(scans[3], slow.id)
    seen = []
    until(lambda: client.status(job["id"])["fraction"] > 0.05 and
          client.status(job["id"])["stage"] == "inference", 180, "the slow job's inference to start")
    with pytest.raises(CancelledError):
        client.wait(job["id"], progress=lambda stage, fraction: seen.append((stage, fraction)),
                    cancel=lambda: True)
    assert client.status(job["id"])["status"] == "cancelled"
    assert any(stage == "inference" and fraction > 0 for stage, fraction in seen)
    with pytest.raises(ServerError, match="cancelled") as error:
        client.download(job["id"], server.state.parent / "never.seg.nrrd")
    assert error.value.status == 409
    client.delete(job["id"])
    assert leftovers(server.state) == []


def test_a_server_killed_mid_job_is_reported_and_its_jobs_resume_on_restart(
        tmp_path, models, scans, token_file):
    fast, slow = models
    state = tmp_path / "state"
    first = Server(state, token_file, [fast.path, slow.path])
    try:
        client = ServerClient(first.url, TOKEN)
        running = client.submit(scans[5], slow.id)["id"]
        queued = [client.submit(scan, fast.id)["id"] for scan in scans[6:8]]
        until(lambda: client.status(running)["stage"] == "inference", 180, "the slow job to run")
        failure: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _wait_into(client, running, failure))
        waiter.start()
        time.sleep(0.3)
        first.stop(signal.SIGKILL)
        waiter.join(timeout=30)
        assert failure and isinstance(failure[0], ServerError), failure
        assert "stopped answering" in str(failure[0]) and running in str(failure[0])
    finally:
        first.stop(signal.SIGKILL)  # the crash under test (or the clean-up when something failed first)

    second = Server(state, token_file, [fast.path, slow.path], port=first.port)
    try:
        assert "3 job(s) resumed" in "".join(second.log)
        client = ServerClient(second.url, TOKEN)
        for job_id, scan, model in [(running, scans[5], slow), *zip(queued, scans[6:8], [fast] * 2)]:
            try:
                done = client.wait(job_id, timeout_s=300)
            except ServerError as error:
                time.sleep(1)
                raise AssertionError(f"{error}; server exit status {second.popen.poll()}; its log:\n"
                                     + "".join(second.log)) from None
            assert done["attempts"] == (2 if job_id == running else 1)
            got = client.download(job_id, tmp_path / f"{job_id}.seg.nrrd")
            assert_same_result(got, local_result(scan, model, tmp_path / f"local-{job_id}.seg.nrrd"))
    finally:
        second.stop()
    assert TOKEN not in "".join(first.log + second.log)


def _wait_into(client: ServerClient, job_id: str, failure: list) -> None:
    try:
        client.wait(job_id, poll_s=0.05)
    except BaseException as error:  # noqa: BLE001 - handed to the test thread
        failure.append(error)


def test_the_server_refuses_to_start_without_a_token(tmp_path, models, capsys):
    from unetseg_engine.cli import main

    os.environ.pop("UNETSEG_SERVER_TOKEN", None)
    assert main(["serve", "--models", str(models[0].path), "--state-dir", str(tmp_path / "s")]) == 2
    assert "needs a token" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert main(["serve", "--token-file", str(short), "--state-dir", str(tmp_path / "s")]) == 2
    assert "too short" in capsys.readouterr().err


def test_unetseg_submit_writes_the_local_result_and_a_dicom_seg_of_a_series(server, models, scans,
                                                                            token_file, tmp_path):
    import pydicom

    from unetseg_engine.cli import main

    fast = models[0]
    out = tmp_path / "submitted.seg.nrrd"
    common = ["--server", server.url, "--token-file", str(token_file), "--model", fast.id, "-q"]
    assert main(["submit", str(scans[9]), "-o", str(out), *common]) == 0
    assert_same_result(out, local_result(scans[9], fast, tmp_path / "local.seg.nrrd"))
    series = scans[0]  # a DICOM series folder, zipped by the client
    assert main(["submit", str(series), "-o", str(tmp_path / "result.dcm"), *common]) == 0
    seg = pydicom.dcmread(tmp_path / "result.dcm")
    source = pydicom.dcmread(sorted(series.iterdir())[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == fast.label_names


def test_a_cancel_racing_a_delete_of_the_same_job_answers_404_not_a_server_error(tmp_path, monkeypatch):
    """``POST /jobs/{id}/cancel`` and ``DELETE /jobs/{id}`` at once: when the delete wins between the
    cancel's look-up and its ``store.cancel``, the cancel answers 404 like any gone job (it used to use
    the store's ``None`` answer as a job: a 500). In process: no workers, no model."""
    from fastapi.testclient import TestClient

    from unetseg_engine.server.app import create_app
    from unetseg_engine.server.jobs import Job, JobStore

    store = JobStore(tmp_path / "state", {})
    store.folder("racing-job").mkdir()  # where the upload would be
    job = store.add(Job(id="racing-job", model="m", output="nrrd", input_name="scan.nrrd",
                        input_path="input/scan.nrrd"))
    client = TestClient(create_app(store, TOKEN, 1 << 20))  # no ``with``: the workers never start
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get(f"/jobs/{job.id}", headers=auth).json()["status"] == "queued"
    cancel = store.cancel

    def delete_wins_first(job_id: str):
        with store.lock:  # what ``store.delete`` does to the table, from another request's thread
            store.jobs.pop(job_id)
        return cancel(job_id)

    monkeypatch.setattr(store, "cancel", delete_wins_first)
    answer = client.post(f"/jobs/{job.id}/cancel", headers=auth)
    assert answer.status_code == 404 and "racing-job" in answer.json()["detail"]
