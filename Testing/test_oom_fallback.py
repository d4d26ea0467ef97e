"""The GPU out-of-memory fallback, every step, on the CPU: the network calls raise
``torch.OutOfMemoryError`` as CUDA would, and the predictor must end as it was built, report the
device that really ran, and serve the next scan."""

import pytest

from helpers import openkbp
from unetseg_engine.errors import UNetSegError
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor
from unetseg_engine.windows import NetworkRunner

torch = pytest.importorskip("torch")


@pytest.fixture
def gpuPredictor(tiny_package, monkeypatch):
    """A loaded predictor that believes it is on CUDA; moving networks to "cuda" is recorded (this
    machine has no GPU), moving them to the CPU is real."""
    predictor = Predictor(device="cpu", sw_batch_size=2)
    predictor.load(tiny_package)
    predictor.device = predictor.network.device = "cuda"  # as built with device="cuda" on a GPU machine
    moves = []
    real_move = NetworkRunner._move_networks

    def move(self, device):
        moves.append(device)
        if device == "cpu":
            real_move(self, device)

    monkeypatch.setattr(NetworkRunner, "_move_networks", move)
    predictor.moves = moves
    return predictor


def running_out_of_gpu_memory(predictor, monkeypatch, cpu_too=False):
    real = predictor.network._run_windows
    calls = []

    def run(array, args, sw_device, out_device, report, is_cancelled):
        calls.append((sw_device, out_device, args["sw_batch_size"]))
        if sw_device == "cuda" or cpu_too:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(array, args, sw_device, out_device, report, is_cancelled)

    monkeypatch.setattr(predictor.network, "_run_windows", run)
    return calls


def test_every_fallback_step_then_cpu_leaves_a_consistent_predictor(gpuPredictor, monkeypatch):
    calls = running_out_of_gpu_memory(gpuPredictor, monkeypatch)
    ct = read_image(openkbp()[0])
    result = gpuPredictor.predict([ct])
    assert calls == [("cuda", "cuda", 2), ("cuda", "cuda", 1), ("cuda", "cpu", 1), ("cpu", "cpu", 2)]
    assert len(result.messages) == 3 and all("out of memory" in m for m in result.messages)
    assert result.device == "cpu"  # what ran the network, not what was asked for ("Done on cuda")
    assert gpuPredictor.moves == ["cpu", "cuda"]  # back on the GPU for the next scan
    assert gpuPredictor.device == gpuPredictor.network.device == "cuda"
    again = gpuPredictor.predict([ct])  # the warm predictor still works
    assert again.device == "cpu" and again.label_map.GetSize() == ct.GetSize()
    assert gpuPredictor.moves == ["cpu", "cuda"] * 2


def test_out_of_memory_everywhere_is_the_users_error_and_restores_the_networks(gpuPredictor,
                                                                                monkeypatch):
    calls = running_out_of_gpu_memory(gpuPredictor, monkeypatch, cpu_too=True)
    with pytest.raises(UNetSegError, match="Out of memory even on the CPU"):
        gpuPredictor.predict([read_image(openkbp()[0])])
    assert len(calls) == 4 and gpuPredictor.moves == ["cpu", "cuda"]
