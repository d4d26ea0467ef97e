"""The engine's worker process (``python -m unetseg_engine.worker``): it survives bad requests, and a
cancel is honoured between stages, not only between sliding windows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from helpers import REPO
from unetseg_engine import inference
from unetseg_engine.worker import Worker
from unetseg_engine.workerprotocol import parse_request


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
