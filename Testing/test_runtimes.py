"""Runtimes (PyTorch, OpenVINO, ONNX Runtime): the same labels on the golden case, the fallback to
PyTorch with one line, the graph cache and its checksum, auto's recorded choice, and the CLI switch.

Runtimes that are not installed are skipped, saying so (``pip install -e '.[fast]'`` adds them).
"""

import importlib.util
import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_golden import FLOORS, organ_dice

from helpers import openkbp
from unetseg_engine import runtimes
from unetseg_engine.cli import main
from unetseg_engine.errors import CancelledError
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor
from unetseg_engine.metrics import dice
from unetseg_engine.modelpkg import get_model, sha256_of

COMPILED = ["openvino", "onnxruntime"]


def needs(runtime: str) -> None:
    if importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} is not installed (pip install -e '.[fast]')")


@pytest.fixture(scope="module")
def ct():
    return read_image(openkbp("pt_201")[0])


@pytest.fixture(scope="module")
def torch_golden(ct):
    predictor = Predictor(device="cpu", runtime="torch")
    predictor.load(get_model("openkbp-hn-oar"))
    return sitk.GetArrayFromImage(predictor.predict([ct]).label_map)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", COMPILED)
def test_golden_case_gives_pytorchs_labels_on_every_runtime(runtime, ct, torch_golden):
    """The shipped model on pt_201: each organ's Dice against the clinical contours stays above its
    golden floor, and against PyTorch's labels above 0.99. (Not 0.999: PyTorch's own CPU path
    computes instance norm through group_norm, which is off float64 by up to 0.6 in the logits
    here; ONNX Runtime is off by 0.008 and OpenVINO by 0.1. Measured on the 4 validation cases:
    ONNX Runtime's labels equal those of PyTorch with its original instance norm voxel for voxel.)"""
    needs(runtime)
    predictor = Predictor(device="cpu", runtime=runtime)
    predictor.load(get_model("openkbp-hn-oar"))
    result = predictor.predict([ct])
    assert result.runtime == runtime and not result.messages
    labels = sitk.GetArrayFromImage(result.label_map)
    against_torch = {v: dice(labels == v, torch_golden == v) for v in range(1, 8)}
    assert min(against_torch.values()) > 0.99, against_torch
    assert np.mean(labels != torch_golden) < 1e-4
    scores = organ_dice(result.label_map, sitk.ReadImage(str(openkbp("pt_201")[1])))
    low = {n: round(d, 3) for n, d in scores.items() if d < FLOORS[n]}
    assert not low, f"{runtime}: organs below their Dice floor: {low}"


@pytest.mark.parametrize("runtime", COMPILED)
def test_blending_tta_ensemble_cancel_and_progress_work_the_same_on_each_runtime(runtime, ct, tmp_path):
    """A two-member ensemble with flip TTA: the blended, flipped, averaged probabilities match
    PyTorch's; progress climbs to 100 %; cancel stops between windows.

    On noise, not on the scan: in windows of constant air a random network's instance norm divides
    rounding noise by sqrt(eps), so there every implementation (PyTorch's two included) differs by up
    to 0.2; on noise they agree to 1e-7."""
    needs(runtime)
    from helpers import make_package, tiny_meta
    from unetseg_engine.modelpkg import write_ensemble
    from unetseg_engine.preprocess import prepare

    members = []
    for seed in (1, 2):
        meta = tiny_meta(f"member-{seed}")
        meta["inference"]["tta_flip_axes"] = ["y", "z"]
        members.append(make_package(tmp_path / f"m{seed}", meta, seed=seed))
    ensemble = write_ensemble(tmp_path / "ens", members, "tiny-ensemble")
    shape = prepare([ct], ensemble.meta["preprocessing"], None).array.shape
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def probabilities(name):
        predictor = Predictor(device="cpu", runtime=name, tta=True, sw_batch_size=1)
        predictor.load(ensemble)
        assert predictor.runtime == name and len(predictor.window_runners) == 2
        events = []
        probs, _ = predictor.network.probabilities(noise, lambda stage, f: events.append((stage, f)))
        return predictor, probs, [f for s, f in events if s == "inference"]

    _, expected, _ = probabilities("torch")
    predictor, probs, fractions = probabilities(runtime)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert len(fractions) >= 2 and fractions == sorted(fractions) and fractions[-1] == 1.0
    calls = []
    with pytest.raises(CancelledError):
        predictor.predict([ct], cancel=lambda: calls.append(1) or len(calls) > 2)


@pytest.mark.parametrize("runtime", COMPILED)
def test_missing_runtime_falls_back_to_pytorch_with_one_line(runtime, ct, tiny_package, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda name, *a: None if name == runtime else real_find_spec(name, *a))
    predictor = Predictor(device="cpu", runtime=runtime)
    predictor.load(tiny_package)
    assert predictor.runtime == "torch"
    result = predictor.predict([ct])
    assert result.runtime == "torch" and len(result.messages) == 1
    line = result.messages[0]
    assert "\n" not in line and runtimes.RUNTIME_TITLES[runtime] in line
    assert "not installed" in line and line.endswith("running on PyTorch.")


@pytest.mark.parametrize("runtime", COMPILED)
def test_graph_the_runtime_cannot_compile_falls_back_to_pytorch(runtime, ct, tiny_package, tmp_path,
                                                              monkeypatch):
    needs(runtime)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an ONNX graph")
    monkeypatch.setattr(runtimes, "onnx_graph", lambda *args: broken)
    predictor = Predictor(device="cpu", runtime=runtime)
    predictor.load(tiny_package)
    result = predictor.predict([ct])
    assert result.runtime == "torch" and len(result.messages) == 1
    assert "could not" in result.messages[0] and result.messages[0].endswith("running on PyTorch.")
    assert result.label_map.GetSize() == ct.GetSize()


def test_cached_graph_is_keyed_by_the_weights_and_exported_again_when_damaged(tiny_package,
                                                                           runtime_cache):
    needs("onnxruntime")
    Predictor(device="cpu", runtime="onnxruntime").load(tiny_package)
    sha = tiny_package.weight_files[0]["sha256"]
    graphs = list((runtime_cache / "onnx").glob(f"{sha[:24]}-c1-16x32x32-*.onnx"))
    assert len(graphs) == 1
    record = json.loads(graphs[0].with_suffix(".json").read_text())
    assert record["weights_sha256"] == sha and record["window_zyx"] == [16, 32, 32]
    good = graphs[0].read_bytes()
    graphs[0].write_bytes(good[:-100] + b"x" * 100)  # damaged, same size
    predictor = Predictor(device="cpu", runtime="onnxruntime")
    predictor.load(tiny_package)
    assert predictor.runtime == "onnxruntime" and not predictor.runtime_notes
    assert sha256_of(graphs[0]) == record["sha256"]


def test_auto_measures_once_then_reads_its_choice(tiny_package, monkeypatch):
    if len(runtimes.installed_runtimes()) < 2:
        pytest.skip("auto has nothing to choose from: only PyTorch is installed")
    first = Predictor(device="cpu", runtime="auto")
    first.load(tiny_package)
    assert first.runtime in runtimes.installed_runtimes()

    def no_second_measurement(*args, **kwargs):
        raise AssertionError("auto measured again")

    monkeypatch.setattr(runtimes, "fastest", no_second_measurement)
    second = Predictor(device="cpu", runtime="auto")
    second.load(tiny_package)
    assert second.runtime == first.runtime


def test_segment_command_takes_runtime_and_names_it(ct, tiny_package, tmp_path, capsys):
    needs("onnxruntime")
    out = tmp_path / "labels.nii.gz"
    status = main(["segment", str(openkbp("pt_201")[0]), "-o", str(out), "--model",
                   str(tiny_package.path), "--device", "cpu", "--runtime", "onnxruntime"])
    assert status == 0 and out.is_file()
    assert "(ONNX Runtime)" in capsys.readouterr().err


class _CountingCompiled:
    """OpenVINO's compiled model, with its ``release_memory`` calls counted."""

    def __init__(self, compiled):
        self.compiled, self.released = compiled, 0

    def release_memory(self):
        self.released += 1
        self.compiled.release_memory()


def test_openvino_gives_back_large_window_buffers_after_each_scan_and_keeps_small_ones(
        ct, tiny_package, monkeypatch):
    """The PyTorch networks are freed once OpenVINO runs the windows; OpenVINO's buffers are released
    after a scan only when the first window allocated more than ``RELEASE_BUFFERS_MB``, and the next
    scan (buffers allocated again) gives the same labels."""
    needs("openvino")
    predictor = Predictor(device="cpu", runtime="openvino")
    predictor.load(tiny_package)
    assert predictor.runtime == "openvino" and predictor.networks == []
    runner = predictor.window_runners[0]
    counting = runner._compiled = _CountingCompiled(runner._compiled)
    first = sitk.GetArrayFromImage(predictor.predict([ct]).label_map)
    assert counting.released == 0 and runner._buffers_mb is not None  # small: kept
    monkeypatch.setattr(runtimes, "RELEASE_BUFFERS_MB", -1.0)  # every size counts as large
    second = sitk.GetArrayFromImage(predictor.predict([ct]).label_map)
    assert counting.released == 1 and runner._buffers_mb is None  # measured again next scan
    third = sitk.GetArrayFromImage(predictor.predict([ct]).label_map)
    assert counting.released == 2
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(third, first)


def test_bfloat16_runs_where_the_cpu_has_it_and_otherwise_float32_with_one_line(ct, tiny_package,
                                                                               monkeypatch):
    """``openvino-bf16`` compiles the graph at bfloat16 where OpenVINO reports native bfloat16 (the
    compiled model's own precision property says so); on a CPU without it the same request runs
    OpenVINO float32 and says so in one line."""
    needs("openvino")
    if runtimes.openvino_has_bf16():
        predictor = Predictor(device="cpu", runtime=runtimes.BF16)
        predictor.load(tiny_package)
        assert predictor.runtime == runtimes.BF16 and not predictor.runtime_notes
        import openvino as ov

        runner = predictor.window_runners[0]
        compiled = runner._compiled
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
        # the convolution that reads the scan stays float32, every other one runs at bfloat16
        # (the compiled model's own record of what each layer runs at)
        ran = [(op.get_rt_info()["originalLayersNames"].astype(str),
                op.get_rt_info()["runtimePrecision"].astype(str))
               for op in compiled.get_runtime_model().get_ordered_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
        model = ov.Core().read_model(str(runner.graph))
        first = [n.get_friendly_name() for n in runtimes.input_convolutions(model)]
        assert len(first) == 1 and len(ran) > 1
        assert [p for names, p in ran if first[0] in names.split(",")] == ["f32"], ran
        assert [p for names, p in ran if first[0] not in names.split(",")] == ["bf16"] * (len(ran) - 1), ran
    monkeypatch.setattr(runtimes, "openvino_has_bf16", lambda: False)
    predictor = Predictor(device="cpu", runtime=runtimes.BF16)
    predictor.load(tiny_package)
    result = predictor.predict([ct])
    assert result.runtime == "openvino" and len(result.messages) == 1, result.messages
    assert "bfloat16" in result.messages[0] and "\n" not in result.messages[0]
    float32 = Predictor(device="cpu", runtime="openvino")
    float32.load(tiny_package)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label_map),
                                  sitk.GetArrayFromImage(float32.predict([ct]).label_map))


@pytest.mark.slow
def test_bfloat16_keeps_the_shipped_models_organs(ct, torch_golden):
    """The shipped model at bfloat16 on pt_201: each organ above its golden floor, and within Dice
    0.99 of PyTorch's float32 labels."""
    needs("openvino")
    if not runtimes.openvino_has_bf16():
        pytest.skip("this CPU has no native bfloat16 for OpenVINO (AVX512_BF16 or AMX)")
    predictor = Predictor(device="cpu", runtime=runtimes.BF16)
    predictor.load(get_model("openkbp-hn-oar"))
    result = predictor.predict([ct])
    assert result.runtime == runtimes.BF16 and not result.messages
    labels = sitk.GetArrayFromImage(result.label_map)
    against_torch = {v: dice(labels == v, torch_golden == v) for v in range(1, 8)}
    print(f"bfloat16 vs PyTorch float32: {against_torch}, voxels differing "
          f"{int((labels != torch_golden).sum())} of {labels.size}")
    assert min(against_torch.values()) > 0.99, against_torch
    scores = organ_dice(result.label_map, sitk.ReadImage(str(openkbp("pt_201")[1])))
    low = {n: round(d, 3) for n, d in scores.items() if d < FLOORS[n]}
    assert not low, f"bfloat16: organs below their Dice floor: {low}"
