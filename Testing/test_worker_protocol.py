"""The engine's worker process (``python -m unetseg_engine.worker``): it survives bad requests, and a
cancel is honoured between stages, not only between sliding windows."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import REPO
from unetseg_engine import inference
from unetseg_engine.worker import Worker
from unetseg_engine.workerprotocol import ProtocolError, parse_event, parse_request, to_json, to_line


def test_requests_that_are_json_but_not_objects_get_an_error_and_the_worker_keeps_serving():
    env = dict(os.environ, PYTHONPATH=str(REPO / "SlicerUNetSeg"))
    process = subprocess.Popen([sys.executable, "-u", "-m", "unetseg_engine.worker"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        out, _ = process.communicate('[1, 2, 3]\nnull\n"text"\n7\n{"cmd": "no-such-command"}\n', timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the worker did not exit when its input closed") from None
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "ready"
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 5, events
    assert all("not a JSON object" in e["message"] for e in errors[:4])
    assert "Unknown command" in errors[4]["message"]  # still reading requests after the bad ones
    assert process.returncode == 0


def test_cancel_during_model_loading_stops_before_preprocessing(tiny_package, tmp_path, monkeypatch):
    voxels = np.random.default_rng(0).integers(-1000, 1000, (20, 24, 24)).astype(np.int16)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "input.nrrd"), useCompression=False)
    request = parse_request({"cmd": "segment", "id": "job", "model": str(tiny_package.path), "device": "cpu",
                             "inputs": [{"path": str(tmp_path / "input.nrrd")}],
                             "output_dir": str(tmp_path / "out")})
    out = io.StringIO()
    worker = Worker(out)
    real_load = inference.Predictor.load
    prepared = []

    def load_while_the_user_cancels(self, package):
        result = real_load(self, package)
        worker.cancelled.add("job")  # the reader thread's doing, while loading takes its seconds
        return result

    monkeypatch.setattr(inference.Predictor, "load", load_while_the_user_cancels)
    monkeypatch.setattr(inference, "prepare", lambda *args, **kwargs: prepared.append(1))
    worker.segment(request)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "cancelled", events[-1]
    assert not prepared, "preprocessing ran after the cancel"
    assert not (tmp_path / "out").exists()


# ---- the typed protocol (workerprotocol), shared by the worker and the Slicer side's runner --------
SEGMENT = {"cmd": "segment", "id": "job", "inputs": [{"path": "in.nrrd", "name": "CT"}], "output_dir": "out",
           "model": "tiny", "device": "cpu", "runtime": "torch", "window": [40.0, 400.0], "overlap": 0.25,
           "sw_batch_size": 2, "tta": True, "postprocess": False, "uncertainty": True}
MESSAGES = [
    ("request", None, {"cmd": "hello"}),
    ("request", None, {"cmd": "quit"}),
    ("request", None, {"cmd": "cancel", "id": "job"}),
    ("request", None, SEGMENT),
    ("request", None, {"cmd": "finetune", "id": "ft", "dataset": "ds", "output": "run", "model": "m",
                       "validation_dataset": None, "settings": {"iterations": 10}}),
    ("event", None, {"event": "ready", "pid": 12, "protocol": 2}),
    ("event", None, {"event": "hello", "pid": 12, "python": "3.12.1", "torch": "2.4", "cuda": None,
                     "cuda_available": False, "gpu_name": None, "monai": "1.4", "torch_error": None,
                     "utf8_mode": True}),
    ("event", None, {"event": "progress", "id": "job", "stage": "inference", "fraction": 0.5}),
    ("event", "segment", {"event": "done", "id": "job", "label_map": "labels.nrrd", "model": "tiny",
                          "device": "cpu", "runtime": "torch", "warm": True,
                          "masks": {"1": {"path": "m.npy", "start": [1, 2, 3], "size": [4, 5, 6]}},
                          "timings": {"read_s": 0.5}, "messages": ["note"],
                          "review": [{"value": 1, "flags": []}], "uncertainty": None}),
    ("event", "finetune", {"event": "done", "id": "ft", "result": {"accepted": True}, "summary": "ok"}),
    ("event", None, {"event": "error", "id": None, "kind": "internal", "message": "bad", "traceback": None,
                     "details": None}),
]


@pytest.mark.parametrize("side, answering, message", MESSAGES,
                         ids=[f"{m.get('cmd') or m.get('event')}-{a or ''}" for _, a, m in MESSAGES])
def test_every_message_survives_a_round_trip_through_its_json_line(side, answering, message):
    parse = parse_request if side == "request" else lambda data: parse_event(data, answering)
    typed = parse(message)
    line = to_line(typed)
    assert line.endswith("\n") and "\n" not in line[:-1]  # one message, one line
    assert parse(line) == typed
    assert json.loads(line) == {**{k: v for k, v in to_json(typed).items()}, **message}  # nothing lost


@pytest.mark.parametrize("line, words", [
    ("not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"id": "job"}', "Unknown command None"),
    ('{"cmd": "segmnet", "id": "job"}', "Unknown command 'segmnet'"),
    ('{"cmd": "segment", "inputs": [{"path": "a"}], "output_dir": "o"}', "lacks its 'id' field"),
    ('{"cmd": "segment", "id": 7, "inputs": [{"path": "a"}], "output_dir": "o"}', "'id' should be str"),
    ('{"cmd": "segment", "id": "j", "inputs": [], "output_dir": "o"}', "has no inputs"),
    ('{"cmd": "segment", "id": "j", "inputs": [{"path": "a"}], "output_dir": "o", "overlapp": 0.5}',
     "does not know: overlapp"),
    ('{"cmd": "segment", "id": "j", "inputs": [{"path": "a"}], "output_dir": "o", "overlap": "half"}',
     "'overlap' should be a number"),
    ('{"cmd": "segment", "id": "j", "inputs": [{"path": "a"}], "output_dir": "o", "tta": 1}',
     "'tta' should be bool"),
    ('{"cmd": "segment", "id": "j", "inputs": [{"path": "a"}], "output_dir": "o", "window": [40]}',
     "'window' should be a list of 2"),
    # protocol 1's geometry beside the header: refused, saying where the geometry comes from now
    ('{"cmd": "segment", "id": "j", "inputs": [{"path": "a", "spacing": [1, 1, 1], "origin": [0, 0, 0], '
     '"direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}], "output_dir": "o"}', "read from the file's header"),
])
def test_requests_that_are_not_protocol_messages_are_refused_saying_why(line, words):
    with pytest.raises(ProtocolError, match=re.escape(words)):
        parse_request(line)


@pytest.mark.parametrize("data, answering, words", [
    ({"event": "finished", "id": "j"}, None, "Unknown event 'finished'"),
    ({"event": "done", "id": "j", "label_map": "l.nrrd"}, None, "Unknown event 'done' (answering None)"),
    ({"event": "done", "id": "j", "result": {}, "summary": "s"}, "segment", "does not know: result, summary"),
    ({"event": "done", "id": "j", "model": "m"}, "segment", "lacks its 'label_map'"),
    ({"event": "error", "id": "j", "kind": "oops", "message": "m"}, None, "Unknown error kind 'oops'"),
    ({"event": "ready", "pid": 1}, None, "lacks its 'protocol' field"),
])
def test_events_that_are_not_protocol_messages_are_refused_saying_why(data, answering, words):
    with pytest.raises(ProtocolError, match=re.escape(words)):
        parse_event(data, answering)


def test_the_protocol_module_needs_neither_torch_nor_numpy():
    """The Slicer side imports it before PyTorch is installed."""
    out = subprocess.run([sys.executable, "-c", "import sys, unetseg_engine.workerprotocol; "
                          "print(sorted({'torch', 'numpy', 'SimpleITK'} & set(sys.modules)))"],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "SlicerUNetSeg")))
    assert out.stdout.strip() == "[]", out.stderr


def _serve(worker: Worker, requests: list[dict]) -> list[dict]:
    """Run the worker's own reader thread and loop over ``requests`` (lines on its stdin, then quit: the
    end of the input would cancel what runs), and return its events."""
    import threading

    read, write = os.pipe()
    with open(read, encoding="utf-8") as stdin, open(write, "w", encoding="utf-8") as parent:
        reader = threading.Thread(target=worker.read_requests, args=(stdin,), daemon=True)
        reader.start()
        parent.write("".join(json.dumps(r) + "\n" for r in [*requests, {"cmd": "quit"}]))
        parent.flush()
        worker.serve()
        parent.close()
        reader.join(timeout=10)
    return [json.loads(line) for line in worker.out.getvalue().splitlines()]


def _oblique_input(folder) -> tuple[str, sitk.Image]:
    from helpers import OBLIQUE_FLIPPED, synthetic_ct

    image = synthetic_ct((20, 24, 28), spacing=(1.5, 2.0, 3.5), direction=OBLIQUE_FLIPPED,
                         origin=(-20.0, 35.0, 12.5))
    path = folder / "input.nrrd"
    sitk.WriteImage(image, str(path), useCompression=False)
    return str(path), image


def test_a_bad_overlap_sent_to_a_warm_worker_is_refused_and_it_keeps_serving(tiny_package, tmp_path):
    path, _ = _oblique_input(tmp_path)
    segment = {"cmd": "segment", "model": str(tiny_package.path), "device": "cpu", "runtime": "torch",
               "inputs": [{"path": path}], "overlap": 0.25}
    worker = Worker(io.StringIO())
    events = _serve(worker, [
        dict(segment, id="first", output_dir=str(tmp_path / "1")),
        dict(segment, id="bad", overlap=1.5, output_dir=str(tmp_path / "2")),  # warm: no constructor check
        dict(segment, id="nan", overlap=float("nan"), output_dir=str(tmp_path / "2")),
        dict(segment, id="batch", sw_batch_size=0, output_dir=str(tmp_path / "2")),
        dict(segment, id="again", overlap=0.5, output_dir=str(tmp_path / "3"))])
    answers = {e["id"]: e for e in events if e["event"] in ("done", "error")}
    assert answers["first"]["event"] == "done" and not answers["first"]["warm"]
    bad = answers["bad"]
    assert bad["event"] == "error" and bad["kind"] == "user", bad
    assert "overlap must be between 0 and 0.95, not 1.5" in bad["message"]
    nan = answers["nan"]  # Python's json writes and reads NaN: the range check refuses it
    assert nan["kind"] == "user" and "overlap must be between 0 and 0.95, not nan" in nan["message"]
    assert answers["batch"]["kind"] == "user" and "batch size" in answers["batch"]["message"]
    assert not (tmp_path / "2").exists()  # refused before anything ran or was written
    assert answers["again"]["event"] == "done" and answers["again"]["warm"]  # the same predictor, still warm
    assert worker.predictor is not None and worker.predictor.overlap is None  # per run, not kept


def test_the_worker_takes_the_geometry_from_the_input_files_header(tiny_package, tmp_path):
    """Oblique, flipped, anisotropic: the labels come back on exactly the header's grid."""
    from unetseg_engine.imageio import grid_differences

    path, image = _oblique_input(tmp_path)
    worker = Worker(io.StringIO())
    events = _serve(worker, [{"cmd": "segment", "id": "job", "model": str(tiny_package.path),
                              "device": "cpu", "runtime": "torch", "inputs": [{"path": path}],
                              "output_dir": str(tmp_path / "out")}])
    done = events[-1]
    assert done["event"] == "done", done
    labels = sitk.ReadImage(done["label_map"])
    assert grid_differences(labels, image) == []
    assert np.allclose(labels.GetDirection(), image.GetDirection(), atol=1e-12)
    assert np.allclose(labels.GetOrigin(), image.GetOrigin(), atol=1e-9)
