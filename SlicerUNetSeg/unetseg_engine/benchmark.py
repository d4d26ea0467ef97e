"""``unetseg benchmark``: our engine against the MONAI reference pipeline, side by side.

The parent process prepares the inputs once (an OpenKBP scan as it is, and the same scan resampled to
a clinical grid of 512 x 512 x 300 voxels over the same physical extent), writes them to temporary
NRRD files, and runs each pipeline in its own child process (``python -m unetseg_engine.benchmark
--child ours|reference ...``), so each peak resident memory is its own. Both use the same model
package (same weights). The parent then scores both label maps against the real contours on the input
grid (mean Dice over the model's labels) and checks that both lie exactly on the input grid.

Times: every child runs its pipeline ``runs`` times in one process. ``total_s`` is the last run, with
the model already loaded (``warm`` is true when there was more than one run): file in, label map on
the input grid out. ``cold_s`` runs from the child's process creation to its first label map
(interpreter start, imports, model load, first run); ``startup_s``, ``import_s``, ``load_model_s`` and
``first_run_s`` break it down. Times are wall-clock seconds; ``peak_rss_mb`` is the child's
``ru_maxrss`` and ``peak_gpu_mb`` PyTorch's peak allocated CUDA memory.

On a machine shared with other work, give ``--threads``: PyTorch's OpenMP threads spin at barriers and
slow down badly when the cores are oversubscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .checks import DEVICES
from .errors import UNetSegError
from .runtimes import RUNTIME_CHOICES, process_status_mb

DATASET = "openkbp_hn_oar"
CLINICAL_SIZE = (512, 512, 300)  # (x, y, z) voxels


# ---- inputs -----------------------------------------------------------------------------------
# the shared data folder beside a source checkout (REPO/../shared/data), as the tests use it
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_root() -> Path:
    """Where the benchmark's real cases are: $UNETSEG_DATA, else ``DEFAULT_DATA``."""
    return Path(os.environ.get("UNETSEG_DATA", DEFAULT_DATA))


def case_files(case: str, dataset: Path | None = None) -> tuple[Path, Path, dict[str, int]]:
    """The image, the label map and the label values (by name) of one case of the OpenKBP dataset."""
    dataset = dataset or data_root() / DATASET
    image = dataset / "imagesTr" / f"{case}_0000.nii.gz"
    label = dataset / "labelsTr" / f"{case}.nii.gz"
    if not image.is_file() or not label.is_file():
        raise UNetSegError(f"Case '{case}' was not found in {dataset} (imagesTr/{case}_0000.nii.gz and "
                           f"labelsTr/{case}.nii.gz). Set UNETSEG_DATA to the folder holding {DATASET}.")
    names: dict[str, int] = {}
    meta_path = dataset / "dataset.json"
    if meta_path.is_file():
        names = {k: int(v) for k, v in json.loads(meta_path.read_text())["labels"].items()}
    return image, label, names


def clinical_grid(image: sitk.Image, size_xyz=CLINICAL_SIZE) -> sitk.Image:
    """An empty grid of ``size_xyz`` voxels covering exactly the physical extent of ``image``."""
    size_in = np.array(image.GetSize(), float)
    spacing_in = np.array(image.GetSpacing())
    extent = size_in * spacing_in
    spacing = extent / np.array(size_xyz, float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    corner = np.array(image.GetOrigin()) - direction @ (spacing_in / 2)
    origin = corner + direction @ (spacing / 2)
    grid = sitk.Image([int(s) for s in size_xyz], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection(image.GetDirection())
    return grid


def make_inputs(case: str, size: str, folder: Path) -> tuple[Path, sitk.Image, dict[str, int]]:
    """Write the benchmark input for ``size`` (native or clinical) as NRRD; returns it and the truth."""
    image_path, label_path, names = case_files(case)
    image = sitk.ReadImage(str(image_path))
    truth = sitk.ReadImage(str(label_path))
    if size == "clinical":
        grid = clinical_grid(image)
        image = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
        truth = sitk.Resample(truth, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                              sitk.sitkUInt8)
    elif size != "native":
        raise UNetSegError(f"Unknown benchmark size '{size}': use native or clinical.")
    path = folder / f"{case}_{size}.nrrd"
    sitk.WriteImage(image, str(path), useCompression=False)
    return path, truth, names


# ---- scoring ----------------------------------------------------------------------------------
def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """True when both images have the same size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(1.0, max(a.GetSpacing())))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def dice_scores(pred: np.ndarray, truth: np.ndarray, labels: list[dict[str, Any]],
                truth_values: dict[str, int]) -> dict[str, float]:
    """Dice per model label against the real contours (matched by name, else by value)."""
    from .metrics import dice

    scores = {}
    for label in labels:
        truth_value = truth_values.get(label["name"], label["value"])
        scores[label["name"]] = round(dice(pred == label["value"], truth == truth_value), 4)
    return scores


# ---- child processes --------------------------------------------------------------------------
_peak_before_reset_mb = 0.0  # the process's peak when ``_reset_peak_rss`` last ran


def _peak_rss_mb() -> float:
    """The process's peak resident size (MB), resets included.

    VmHWM where there is /proc: it starts afresh at ``exec``, where Linux's ``ru_maxrss`` starts
    with the parent's peak (a child of a 2 GB test process read 2.1 GB before doing anything).
    """
    now = _peak_rss_since_reset_mb()
    if now is None:
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux
    return max(now, _peak_before_reset_mb)


def _reset_peak_rss() -> bool:
    """Start this process's peak resident size (VmHWM) afresh, so that a warm run's own peak can be
    read (Linux: ``5`` into ``/proc/self/clear_refs``); False where that is not possible."""
    global _peak_before_reset_mb
    peak = _peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    _peak_before_reset_mb = peak
    return True


def _peak_rss_since_reset_mb() -> float | None:
    """VmHWM (MB): the peak resident size since ``_reset_peak_rss``; None without /proc."""
    return process_status_mb("VmHWM")


def _run_ours(args, result: dict[str, Any]) -> sitk.Image:
    import torch

    from .inference import Predictor

    result["import_s"] = time.perf_counter() - result.pop("_t_import")
    result["threads"] = torch.get_num_threads()
    result["rss_after_import_mb"] = _peak_rss_mb()
    predictor = Predictor(device=args.device, postprocess=not args.no_postprocess,
                          num_threads=args.threads, runtime=args.runtime)
    t = time.perf_counter()
    predictor.load(args.model)
    load_s = time.perf_counter() - t
    result["runtime"] = predictor.runtime
    result["runtime_notes"] = predictor.runtime_notes
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_run() -> tuple[sitk.Image, dict[str, Any]]:
        t0 = time.perf_counter()
        image = sitk.ReadImage(args.input)
        read_s = time.perf_counter() - t0
        out = predictor.predict([image])
        if args.device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        return out.label_map, {"total_s": total, "stages": {"read_s": read_s, **out.timings},
                               "done": time.time()}

    runs = []
    label = None
    warm_peak = False
    for i in range(args.runs):
        if i == args.runs - 1 and i > 0:
            # the last run's own peak, with the model loaded and the runtime's graph compiled: what
            # every scan after the first costs. The process's peak also holds the first run and, with
            # an empty cache, the graph's export. Nothing of the previous run is held through it.
            label = None
            warm_peak = _reset_peak_rss()
        label, run = one_run()
        runs.append(run)
    assert label is not None  # --runs is at least 1
    if warm_peak:
        result["peak_rss_warm_mb"] = _peak_rss_since_reset_mb()
    result.update(_summary(runs, load_s, result))
    result.update(_window_figures(predictor, args))
    return label


def _window_figures(predictor, args) -> dict[str, Any]:
    """Seconds per window (best of 3 calls on a batch of the model's windows) and the model load
    time once the runtime's cache is filled (what a later process start pays)."""
    import torch

    from .inference import Predictor

    window_args = predictor.network.windows_args()
    batch = window_args["sw_batch_size"]
    channels = len(predictor.model.meta["inputs"])
    sample = torch.randn((batch, channels, *window_args["roi_size"]),
                         generator=torch.Generator().manual_seed(0)).to(args.device)
    runner = (predictor.networks if predictor.runtime == "torch" else predictor.window_runners)[0]
    times = []
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            runner(sample)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    again = Predictor(device=args.device, num_threads=args.threads, runtime=args.runtime)
    t = time.perf_counter()
    again.load(args.model)
    return {"window_s": min(times) / batch, "window_batch": batch,
            "load_model_cached_s": time.perf_counter() - t}


def _run_reference(args, result: dict[str, Any]) -> sitk.Image:
    import torch

    from .modelpkg import get_model
    from .reference import ReferencePipeline

    result["import_s"] = time.perf_counter() - result.pop("_t_import")
    result["threads"] = torch.get_num_threads()
    result["rss_after_import_mb"] = _peak_rss_mb()
    t = time.perf_counter()
    pipeline = ReferencePipeline(get_model(args.model), device=args.device)
    pipeline.load()
    load_s = time.perf_counter() - t
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    label = None
    warm_peak = False
    for i in range(args.runs):
        if i == args.runs - 1 and i > 0:  # the last run's own peak, as for ours
            label = None
            warm_peak = _reset_peak_rss()
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        label = pipeline.run(args.input, stages)
        total = time.perf_counter() - t0
        runs.append({"total_s": total, "stages": {f"{k}_s": v for k, v in stages.items()},
                     "done": time.time()})
    assert label is not None  # --runs is at least 1
    if warm_peak:
        result["peak_rss_warm_mb"] = _peak_rss_since_reset_mb()
    result.update(_summary(runs, load_s, result))
    return label


def _summary(runs: list[dict[str, Any]], load_s: float, result: dict[str, Any]) -> dict[str, Any]:
    """``total_s``: the last run (model loaded); ``cold_s``: process start to the first label map."""
    last = runs[-1]
    return {
        "total_s": last["total_s"],
        "warm": len(runs) > 1,
        "cold_s": runs[0]["done"] - result["_created"],
        "first_run_s": load_s + runs[0]["total_s"],
        "load_model_s": load_s,
        "stages": last["stages"],
        "runs_s": [r["total_s"] for r in runs],
    }


def child_main(argv: list[str] | None = None) -> int:
    """Run one pipeline on one input file; write its label map and a JSON result."""
    started = time.time()
    parser = argparse.ArgumentParser(prog="python -m unetseg_engine.benchmark")
    parser.add_argument("--child", required=True, choices=["ours", "reference"])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu", choices=[d for d in DEVICES if d != "auto"])
    parser.add_argument("--runtime", default="torch", choices=[r for r in RUNTIME_CHOICES if r != "auto"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-postprocess", action="store_true", help="ours without the model's clean-up")
    parser.add_argument("--pred", required=True, help="where to write the label map")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    result: dict[str, Any] = {"pipeline": args.child, "device": args.device, "_created": started}
    try:
        import psutil

        result["_created"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - then cold_s starts when this function does
        pass
    result["startup_s"] = started - result["_created"]
    result["_t_import"] = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        result.pop("_t_import")
        result.pop("_created")
        result["skipped"] = "no CUDA device visible to PyTorch"
        Path(args.result).write_text(json.dumps(result))
        return 0
    try:
        run = _run_ours if args.child == "ours" else _run_reference
        label = run(args, result)
    except Exception as error:  # noqa: BLE001 - reported in the table, not a crash of the benchmark
        result.pop("_t_import", None)
        result.pop("_created", None)
        result["error"] = f"{type(error).__name__}: {error}"
        Path(args.result).write_text(json.dumps(result))
        return 1
    result.pop("_created", None)
    result["peak_rss_mb"] = _peak_rss_mb()
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    sitk.WriteImage(label, args.pred, useCompression=False)
    Path(args.result).write_text(json.dumps(result))
    return 0


def run_child(kind: str, input_path: Path, model: str, device: str, folder: Path, runs: int,
              threads: int | None, postprocess: bool = True,
              runtime: str = "torch") -> tuple[dict[str, Any], Path]:
    """One pipeline in a child process. Ours starts with an empty runtime cache, so its cold start
    includes exporting and compiling the graph (a user's first Segment)."""
    name = f"{input_path.stem}_{kind}_{runtime}_{device}" if kind == "ours" else \
        f"{input_path.stem}_{kind}_{device}"
    pred = folder / f"{name}.nrrd"
    result_path = folder / f"{name}.json"
    command = [sys.executable, "-m", "unetseg_engine.benchmark", "--child", kind, "--input",
               str(input_path), "--model", model, "--device", device, "--runs", str(runs),
               "--pred", str(pred), "--result", str(result_path), "--runtime", runtime]
    if threads:
        command += ["--threads", str(threads)]
    if not postprocess:
        command.append("--no-postprocess")
    env = dict(os.environ, PYTHONWARNINGS="ignore", UNETSEG_CACHE=str(folder / f"cache-{name}"))
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        result = {"pipeline": kind, "error": f"child exited with status {process.returncode}: "
                                             + " | ".join(tail)}
    return result, pred


# ---- the benchmark ----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    for name in ("torch", "monai", "SimpleITK", "numpy", "openvino", "onnxruntime"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # noqa: BLE001
            pass
    return info


def _score(result: dict[str, Any], pred_path: Path, reference_grid: sitk.Image, truth: np.ndarray,
           labels, names) -> None:
    if "error" in result or "skipped" in result or not pred_path.is_file():
        return
    pred = sitk.ReadImage(str(pred_path))
    result["on_input_grid"] = bool(same_grid(pred, reference_grid))
    scores = dice_scores(sitk.GetArrayViewFromImage(pred), truth, labels, names)
    result["dice_per_label"] = scores
    result["dice"] = round(float(np.mean(list(scores.values()))), 4)


def _ratios(entry: dict[str, Any], ours: dict[str, Any], ref: dict[str, Any], device: str) -> None:
    if "total_s" in ours and "total_s" in ref:
        entry["ratio_time"] = round(ours["total_s"] / ref["total_s"], 4)
        entry["ratio_time_cold"] = round(ours["cold_s"] / ref["cold_s"], 4)
        entry["ratio_memory"] = round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 4)
        if ours.get("peak_rss_warm_mb") and ref.get("peak_rss_warm_mb"):
            entry["ratio_memory_warm"] = round(ours["peak_rss_warm_mb"] / ref["peak_rss_warm_mb"], 4)
        if device == "cuda" and ref.get("peak_gpu_mb"):
            entry["ratio_gpu_memory"] = round(ours["peak_gpu_mb"] / ref["peak_gpu_mb"], 4)
    if "dice" in ours and "dice" in ref:
        entry["dice_difference"] = round(ours["dice"] - ref["dice"], 4)


def run_benchmark(model: str | None, case: str = "pt_201", sizes=("native", "clinical"),
                  devices=("cpu",), skip_reference: bool = False, threads: int | None = None,
                  keep: Path | None = None, reference_runs: int | None = None,
                  postprocess: bool = True, log=print, runtimes=None) -> dict[str, Any]:
    """Run the comparison and return the result dictionary (the JSON written by --json): one entry
    of ``cases`` per input size, device and runtime of ours (the MONAI reference runs once per size
    and device, and its figures appear in each of those entries)."""
    from .modelpkg import get_model
    from .runtimes import REDUCED, RUNTIMES, installed_runtimes

    runtimes = list(runtimes or installed_runtimes())
    for runtime in runtimes:
        if runtime not in RUNTIMES + REDUCED:
            raise UNetSegError(f"Unknown runtime '{runtime}' in --runtimes: use "
                               f"{', '.join(RUNTIMES + REDUCED)}.")

    package = get_model(model)
    model_path = str(package.path)
    report: dict[str, Any] = {"machine": machine_info(),
                              "model": {"id": package.id, "path": model_path,
                                        "sha256": package.weights_key},
                              "cases": []}
    with tempfile.TemporaryDirectory(prefix="unetseg-bench-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            input_path, truth_image, names = make_inputs(case, size, folder)
            truth = sitk.GetArrayFromImage(truth_image)
            grid = truth_image  # the input grid (the truth shares it)
            for device in devices:
                base: dict[str, Any] = {"name": f"{case} {size}", "size": size, "device": device,
                                        "shape": list(truth_image.GetSize()),
                                        "spacing_mm": [round(s, 4) for s in truth_image.GetSpacing()]}
                ref = None
                # the compiled runtimes run on the CPU; on CUDA the engine stays on PyTorch
                for runtime in (runtimes if device == "cpu" else ["torch"]):
                    entry = dict(base, runtime=runtime)
                    log(f"[{case} {size} {device}] our engine on {runtime} ...")
                    ours, pred = run_child("ours", input_path, model_path, device, folder, 2, threads,
                                           postprocess, runtime)
                    ours["postprocess"] = postprocess
                    if runtime in RUNTIMES and runtime != "torch" and "total_s" in ours:
                        # every later process start finds the exported graph cached: its own figures
                        again, _ = run_child("ours", input_path, model_path, device, folder, 2, threads,
                                             postprocess, runtime)
                        ours["graph_cached"] = {k: again.get(k) for k in (
                            "total_s", "cold_s", "peak_rss_mb", "peak_rss_warm_mb", "error")
                            if k in again}
                    _score(ours, pred, grid, truth, package.labels, names)
                    entry["ours"] = ours
                    if "skipped" in ours:
                        entry["skipped"] = ours["skipped"]
                        log(f"[{case} {size} {device}] skipped: {ours['skipped']}")
                        report["cases"].append(entry)
                        continue
                    if not skip_reference and ref is None:
                        runs = reference_runs or (1 if size == "clinical" else 2)
                        log(f"[{case} {size} {device}] MONAI reference ...")
                        ref, pred = run_child("reference", input_path, model_path, device, folder,
                                              runs, threads)
                        _score(ref, pred, grid, truth, package.labels, names)
                    if ref is not None:
                        entry["reference"] = ref
                        _ratios(entry, ours, ref, device)
                    report["cases"].append(entry)
    return report


# ---- output -----------------------------------------------------------------------------------
def _fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def case_runtimes(report: dict[str, Any]) -> list[str]:
    seen = [c.get("runtime", "torch") for c in report["cases"]]
    return list(dict.fromkeys(seen)) or ["torch"]


def format_table(report: dict[str, Any]) -> str:
    lines = []
    m = report["machine"]
    cores = m.get("cpu_affinity", m.get("cpu_count"))
    lines.append(f"Machine: {m.get('processor') or m.get('platform')}, {cores}"
                 f" CPU cores, {m.get('memory_gb', '?')} GB; torch {m.get('torch')}, monai {m.get('monai')}; "
                 f"load average at start {m.get('load_average')}")
    lines.append(f"Model: {report['model']['id']} ({report['model']['path']})")
    header = (f"{'case':<32}{'dev':<5}{'pipeline':<10}{'runtime':<13}{'warm s':>8}{'cold s':>8}"
              f"{'s/window':>9}{'peak RSS MB':>12}{'warm peak':>10}{'cached':>8}{'GPU MB':>8}{'Dice':>8}"
              f"{'grid':>6}")
    lines += ["", header, "-" * len(header)]
    shown: set[int] = set()
    for case in report["cases"]:
        name = f"{case['name']} {'x'.join(map(str, case['shape']))}"
        if case.get("skipped"):
            lines.append(f"{name:<32}{case['device']:<5}skipped: {case['skipped']}")
            continue
        for key, label in (("ours", "ours"), ("reference", "MONAI")):
            r = case.get(key)
            if r is None or id(r) in shown:  # the reference once per size and device
                continue
            shown.add(id(r))
            runtime = r.get("runtime", "torch")
            if r.get("runtime_notes"):
                runtime += "!"
            if "error" in r:
                lines.append(f"{name:<32}{case['device']:<5}{label:<10}error: {r['error']}")
                continue
            grid = {True: "ok", False: "OFF"}.get(r.get("on_input_grid"), "-")
            lines.append(f"{name:<32}{case['device']:<5}{label:<10}{runtime:<13}"
                         f"{_fmt(r.get('total_s')):>8}{_fmt(r.get('cold_s')):>8}"
                         f"{_fmt(r.get('window_s'), '.3f'):>9}{_fmt(r.get('peak_rss_mb'), '.0f'):>12}"
                         f"{_fmt(r.get('peak_rss_warm_mb'), '.0f'):>10}"
                         f"{_fmt(r.get('graph_cached', {}).get('peak_rss_mb'), '.0f'):>8}"
                         f"{_fmt(r.get('peak_gpu_mb'), '.0f'):>8}{_fmt(r.get('dice'), '.4f'):>8}{grid:>6}")
            for note in r.get("runtime_notes", []):
                lines.append(f"{'':<37}! {note}")
        if "ratio_time" in case:
            lines.append(f"{'':<37}ours ({case.get('runtime', 'torch')})/MONAI: time "
                         f"{case['ratio_time']:.3f} (cold "
                         f"{case['ratio_time_cold']:.3f}), memory {case['ratio_memory']:.3f}"
                         + (f", GPU memory {case['ratio_gpu_memory']:.3f}"
                            if "ratio_gpu_memory" in case else "")
                         + (f", Dice {case['dice_difference']:+.4f}" if "dice_difference" in case else ""))
    lines += ["", "peak RSS: the whole process (first run included; with an empty cache, the graph's "
              "export); warm peak: the last warm run alone; cached: the whole of a second process that "
              "found the graph cached (every start after the first).", "", "Stages (s, warm run):"]
    for case in report["cases"]:
        for key in ("ours", "reference"):
            r = case.get(key)
            if not r or "stages" not in r:
                continue
            if key == "reference" and case.get("runtime") not in (None, case_runtimes(report)[0]):
                continue
            stages = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r["stages"].items())
            who = f"ours {r.get('runtime', 'torch')}" if key == "ours" else key
            cached = (f" (cached {r['load_model_cached_s']:.2f})" if "load_model_cached_s" in r else "")
            lines.append(f"  {case['name']} {case['device']} {who}: load model {r['load_model_s']:.2f}"
                         f"{cached} | {stages}")
    return "\n".join(lines)


def benchmark_cli(args) -> int:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        if size not in ("native", "clinical"):
            raise UNetSegError(f"Unknown size '{size}' in --sizes: use native and/or clinical.")
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    runtimes = getattr(args, "runtimes", "installed")
    runtimes = None if runtimes in (None, "installed") else \
        [r.strip() for r in runtimes.split(",") if r.strip()]
    report = run_benchmark(args.model, args.case, sizes, devices, args.skip_reference,
                           threads=getattr(args, "threads", None), keep=getattr(args, "keep", None),
                           reference_runs=getattr(args, "reference_runs", None),
                           postprocess=not getattr(args, "no_postprocess", False),
                           log=lambda text: print(text, file=sys.stderr, flush=True), runtimes=runtimes)
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON written to {args.json_path}")
    failed = [c for c in report["cases"] for k in ("ours", "reference") if "error" in c.get(k, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(child_main())
