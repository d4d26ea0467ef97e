"""CUDA path (skipped without a GPU): same labels as on the CPU, modest GPU memory, and the
out-of-memory fallback recovers with a message."""

import pytest
import SimpleITK as sitk

from helpers import openkbp
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor
from unetseg_engine.metrics import dice

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def test_cuda_matches_cpu(tiny_package):
    image = read_image(openkbp()[0])
    results = {}
    for device in ("cpu", "cuda"):
        predictor = Predictor(device=device)
        predictor.load(tiny_package)
        torch.cuda.reset_peak_memory_stats()
        results[device] = sitk.GetArrayFromImage(predictor.predict([image]).label_map)
    assert torch.cuda.max_memory_allocated() < 4e9
    for value in (1, 2, 3):
        assert dice(results["cpu"] == value, results["cuda"] == value) > 0.98


def test_out_of_memory_falls_back_with_a_message(tiny_package, monkeypatch):
    predictor = Predictor(device="cuda")
    predictor.load(tiny_package)
    real = predictor.network._run_windows
    calls = []

    def first_call_runs_out_of_memory(*args, **kwargs):
        calls.append(args[2:4])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor.network, "_run_windows", first_call_runs_out_of_memory)
    result = predictor.predict([read_image(openkbp()[0])])
    assert len(calls) == 2 and result.messages and "out of memory" in result.messages[0]
