"""``unetseg benchmark``: the machinery (inputs, child processes, scoring, JSON), never the speed.

A tiny randomly initialised package with the OpenKBP label names runs through both pipelines on the
real native scan. The test checks the JSON shape and that both label maps lie on the input grid; it
asserts nothing about times.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import OPENKBP_LABELS, make_package, openkbp, tiny_meta
from unetseg_engine.benchmark import CLINICAL_SIZE, clinical_grid, same_grid
from unetseg_engine.cli import main
from unetseg_engine.runtimes import installed_runtimes


def test_clinical_grid_covers_the_same_extent():
    image = sitk.Image([128, 128, 128], sitk.sitkInt16)
    image.SetSpacing([5.4, 5.4, 3.0])
    image.SetOrigin([-344.3, -344.3, 190.5])
    image.SetDirection([1, 0, 0, 0, 1, 0, 0, 0, -1])
    grid = clinical_grid(image)
    assert grid.GetSize() == CLINICAL_SIZE
    assert grid.GetDirection() == image.GetDirection()

    def corners(img):
        pts = [img.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in (i, j, k)])
               for i in (0, img.GetSize()[0]) for j in (0, img.GetSize()[1]) for k in (0, img.GetSize()[2])]
        return np.array(pts)

    np.testing.assert_allclose(corners(grid), corners(image), atol=1e-6)


def test_a_warm_runs_peak_is_read_after_the_peak_is_reset():
    """The benchmark's ``peak_rss_warm_mb``: after a reset, a 300 MB array freed earlier no longer
    counts, and one made after it does."""
    from unetseg_engine.benchmark import _peak_rss_mb, _peak_rss_since_reset_mb, _reset_peak_rss

    if not _reset_peak_rss():
        pytest.skip("this system has no /proc/self/clear_refs to reset the peak resident size")
    big = np.ones(300 * 2**20 // 8)  # touched, so resident
    del big
    before = _peak_rss_since_reset_mb()
    assert _reset_peak_rss()
    after = _peak_rss_since_reset_mb()
    assert before is not None and after is not None and after < before - 200
    again = np.ones(300 * 2**20 // 8)
    assert _peak_rss_since_reset_mb() > after + 250
    del again
    assert _peak_rss_mb() >= before  # the process's peak still counts what came before the resets


def test_a_benchmark_child_asked_for_no_runs_is_refused_and_writes_nothing(tmp_path, capsys):
    """``--runs 0`` left the child without a label map (an IndexError reported as the pipeline's
    error): it is refused before anything is read or written."""
    from unetseg_engine.benchmark import child_main

    result, pred = tmp_path / "result.json", tmp_path / "pred.nrrd"
    with pytest.raises(SystemExit) as refused:
        child_main(["--child", "ours", "--input", str(tmp_path / "absent.nrrd"), "--model", "m",
                    "--runs", "0", "--pred", str(pred), "--result", str(result)])
    assert refused.value.code == 2 and "--runs must be at least 1" in capsys.readouterr().err
    assert not result.exists() and not pred.exists()


@pytest.mark.slow
def test_benchmark_native_json_and_grids(tmp_path):
    ct_path, _ = openkbp("pt_201")
    meta = tiny_meta("tiny-bench", label_names=OPENKBP_LABELS)
    meta["inference"]["overlap"] = 0.5
    package = make_package(tmp_path / "tiny-bench", meta)
    out_json = tmp_path / "bench.json"
    keep = tmp_path / "keep"
    status = main(["benchmark", "--model", str(package.path),
                   "--sizes", "native", "--device", "cpu", "--json", str(out_json), "--keep", str(keep),
                   "--threads", "1"])
    assert status == 0
    report = json.loads(out_json.read_text())
    assert set(report) >= {"machine", "cases"}
    installed = installed_runtimes()
    # one entry per installed runtime, each naming it; the reference ran once and is in each
    assert [c["runtime"] for c in report["cases"]] == installed
    assert all(c["ours"]["runtime"] == c["runtime"] and not c["ours"]["runtime_notes"]
               for c in report["cases"])
    assert all(c["reference"] == report["cases"][0]["reference"] for c in report["cases"])
    case = report["cases"][0]
    assert case["device"] == "cpu" and case["shape"] == [128, 128, 128]
    assert case["ours"]["window_s"] > 0 and case["ours"]["load_model_cached_s"] > 0
    for key in ("ours", "reference"):
        result = case[key]
        assert "error" not in result, result.get("error")
        for field in ("total_s", "cold_s", "peak_rss_mb", "dice", "stages"):
            assert field in result
        assert result["on_input_grid"] is True
        assert 0.0 <= result["dice"] <= 1.0
        assert set(result["dice_per_label"]) == set(OPENKBP_LABELS)
    for key in ("ours", "reference"):  # 2 runs each: the last one's own peak is there too
        result = case[key]
        # (VmHWM and getrusage may differ by a page or two)
        assert result["rss_after_import_mb"] < result["peak_rss_warm_mb"] <= result["peak_rss_mb"] + 1
    for entry in report["cases"]:  # the compiled runtimes, again in a process with the graph cached
        cached = entry["ours"].get("graph_cached")
        assert (cached is not None) == (entry["runtime"] in ("openvino", "onnxruntime"))
        if cached:
            assert "error" not in cached and cached["peak_rss_mb"] > 0 and cached["total_s"] > 0
    assert "inference_s" in case["ours"]["stages"]
    assert "sliding_window_s" in case["reference"]["stages"]
    for key in ("ratio_time", "ratio_memory"):
        assert case[key] > 0

    # Independently of the benchmark's own check: both kept label maps are on the scan's grid.
    scan = sitk.ReadImage(str(ct_path))
    for name in [f"ours_{runtime}" for runtime in installed] + ["reference"]:
        pred = sitk.ReadImage(str(keep / f"pt_201_native_{name}_cpu.nrrd"))
        assert same_grid(pred, scan)
        values = set(np.unique(sitk.GetArrayViewFromImage(pred)).tolist())
        assert values <= set(range(len(OPENKBP_LABELS) + 1))
