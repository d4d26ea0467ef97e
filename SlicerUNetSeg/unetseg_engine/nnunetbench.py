"""``unetseg benchmark --against nnunet``: nnU-Net's own predictor and ours, same folder, same scans.

The parent imports the nnU-Net folder once as our package, writes the inputs (the OpenKBP scan as it
is, and resampled to the clinical 512 x 512 x 300 grid, as ``benchmark.py`` does), and runs each
predictor in its own child process (``python -m unetseg_engine.nnunetbench --child nnunet|ours``) so
each peak resident memory (VmHWM) is its own. ``total_s``: reading the file to the label map on
the input grid, model already loaded. Ours runs once per runtime asked for (``--runtimes``: torch,
openvino, onnxruntime, openvino-bf16; default every installed one, and openvino-bf16 where the CPU
has bfloat16); for the compiled runtimes the ONNX graph is
exported into the cache by a first child that only loads the model (as a user's first run does), so
the measured child's peak memory is that of a prediction. Both mirror over the checkpoint's axes
(nnU-Net's default) unless ``--no-mirror``. Agreement: per-label Dice between the two label maps;
each figure carries the load average when it was taken (the machine may be shared).

Without ``--nnunet-folder`` the benchmark builds a folder of nnU-Net's default 3d_fullres plan for
OpenKBP (``Testing/fixtures/nnunet/nnUNetPlans.json``: 6 stages, 32-320 features, 128^3 patch) with
nnU-Net's He-initialised weights: random weights time the same as trained ones. nnunetv2 must be
installed (it is a benchmark dependency, never the engine's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import metrics
from .benchmark import _peak_rss_mb
from .errors import UNetSegError

FIXTURE_PLANS = Path(__file__).resolve().parents[2] / "Testing" / "fixtures" / "nnunet"


def nnunet_predictor(folder, mirror: bool):
    """nnU-Net's own predictor on the CPU for every fold of ``folder``, as nnUNetv2_predict sets it
    up (step 0.5, Gaussian weights, mirroring as asked)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=None,
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


def _child(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["nnunet", "ours"], required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--folder", required=True, help="nnU-Net folder, or our package for ours")
    parser.add_argument("--pred", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--no-mirror", action="store_true")
    parser.add_argument("--load-only", action="store_true",
                        help="load the model (exporting its graph into the cache) and stop")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"pipeline": args.child, "threads": torch.get_num_threads()}
    t = time.perf_counter()
    if args.child == "nnunet":
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        predictor = nnunet_predictor(args.folder, mirror=not args.no_mirror)
        result["load_model_s"] = time.perf_counter() - t
        t = time.perf_counter()
        data, props = SimpleITKIO().read_images([args.input])
        labels = predictor.predict_single_npy_array(data, props, None, None, False)
        result["total_s"] = time.perf_counter() - t
        image = sitk.GetImageFromArray(labels.astype(np.uint8))
        image.CopyInformation(sitk.ReadImage(args.input))
    else:
        from .inference import Predictor
        from .modelpkg import load_package

        predictor = Predictor(device="cpu", runtime=args.runtime, mirror=not args.no_mirror)
        predictor.load(load_package(args.folder))
        result["load_model_s"] = time.perf_counter() - t
        if args.load_only:
            Path(args.result).write_text(json.dumps(result))
            return 0
        t = time.perf_counter()
        res = predictor.predict([sitk.ReadImage(args.input)])
        result["total_s"] = time.perf_counter() - t
        result["stages"] = res.timings
        result["runtime"] = res.runtime
        image = res.label_map
    result["peak_rss_mb"] = _peak_rss_mb()
    sitk.WriteImage(image, args.pred, useCompression=False)
    Path(args.result).write_text(json.dumps(result))
    return 0


def _run_child(kind, input_path: Path, folder: Path, work: Path, threads, mirror, runtime,
               load_only=False):
    work.mkdir(parents=True, exist_ok=True)
    pred, result = work / f"{input_path.stem}_{kind}.nrrd", work / f"{input_path.stem}_{kind}.json"
    command = [sys.executable, "-m", "unetseg_engine.nnunetbench", "--child", kind, "--input",
               str(input_path), "--folder", str(folder), "--pred", str(pred), "--result", str(result),
               "--runtime", runtime]
    command += ["--threads", str(threads)] if threads else []
    command += [] if mirror else ["--no-mirror"]
    command += ["--load-only"] if load_only else []
    env = dict(os.environ, PYTHONWARNINGS="ignore", UNETSEG_CACHE=str(work / "cache"))
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    if not result.is_file():
        tail = " | ".join((process.stderr or process.stdout).strip().splitlines()[-3:])
        return {"pipeline": kind, "error": f"exit {process.returncode}: {tail}"}, None
    return json.loads(result.read_text()), pred


def default_folder(work: Path) -> Path:
    """A random-weights folder of nnU-Net's default 3d_fullres plan for OpenKBP."""
    from .nnunet import write_random_folder

    plans = FIXTURE_PLANS / "nnUNetPlans.json"
    if not plans.is_file():
        raise UNetSegError(f"{plans} is missing (it ships in a source checkout); give --nnunet-folder.")
    return write_random_folder(plans, FIXTURE_PLANS / "nnUNetTrainer__nnUNetPlansTiny__3d_fullres" /
                               "dataset.json", work / "nnunet-default")


def _agreement(a: Path, b: Path, labels) -> dict[str, Any]:
    x, y = sitk.GetArrayFromImage(sitk.ReadImage(str(a))), sitk.GetArrayFromImage(sitk.ReadImage(str(b)))
    dice = {}
    for label in labels:
        p, q = x == label["value"], y == label["value"]
        if p.sum() + q.sum():
            dice[label["name"]] = round(metrics.dice(p, q), 4)
    return {"agreement_dice": dice, "voxels_differing": int((x != y).sum())}


def run(folder: Path | None, case: str, sizes, threads=None, mirror=True, runtimes=("torch",),
        log=print) -> dict[str, Any]:
    """nnU-Net's predictor once per size, ours once per size and runtime (``runtimes``: torch,
    openvino, onnxruntime, openvino-bf16); each case entry holds ``nnunet`` and ``ours`` (runtime ->
    figures, with the time and memory ratios and the agreement of that runtime's labels with nnU-Net's)."""
    from .benchmark import machine_info, make_inputs
    from .nnunet import import_nnunet
    from .runtimes import BF16, RUNTIMES

    for runtime in runtimes:
        if runtime not in RUNTIMES + (BF16,):
            raise UNetSegError(f"Unknown runtime '{runtime}' for --against nnunet: use "
                               f"{', '.join(RUNTIMES + (BF16,))}.")
    report: dict[str, Any] = {"machine": machine_info(), "mirror": mirror, "cases": []}
    with tempfile.TemporaryDirectory(prefix="unetseg-nnbench-") as tmp:
        work = Path(tmp)
        folder = Path(folder) if folder else default_folder(work)
        package = import_nnunet(folder, "benchmark", model_id="nnbench", destination=work / "models")
        report["folder"] = folder.name
        report["network"] = package.meta["network"]["params"].get("features_per_stage")
        for size in sizes:
            path, _, _ = make_inputs(case, size, work)
            entry: dict[str, Any] = {"case": case, "size": size,
                                     "input_size": list(sitk.ReadImage(str(path)).GetSize()),
                                     "ours": {}}
            log(f"{case} {size}: nnunet ...")
            entry["nnunet"], theirs = _run_child("nnunet", path, folder, work, threads, mirror, "torch")
            entry["nnunet"]["load_average"] = [round(v, 2) for v in os.getloadavg()]
            for runtime in runtimes:
                log(f"{case} {size}: ours ({runtime}) ...")
                if runtime != "torch":  # export the graph first, as an earlier run would have:
                    # the export runs the network once in PyTorch, which is no part of a prediction
                    _run_child("ours", path, package.path, work / runtime, threads, mirror, runtime,
                               load_only=True)
                ours, pred = _run_child("ours", path, package.path, work / runtime, threads, mirror,
                                        runtime)
                ours["load_average"] = [round(v, 2) for v in os.getloadavg()]
                if theirs and pred:
                    ours.update(_agreement(theirs, pred, package.labels))
                    ours["time_ratio"] = ours["total_s"] / entry["nnunet"]["total_s"]
                    ours["memory_ratio"] = ours["peak_rss_mb"] / entry["nnunet"]["peak_rss_mb"]
                entry["ours"][runtime] = ours
            report["cases"].append(entry)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"nnU-Net folder {report['folder']} (features {report['network']}), mirroring "
             f"{'on' if report['mirror'] else 'off'}",
             "| case | input | ours on | nnU-Net s | ours s | time ratio | nnU-Net MB | ours MB "
             "| memory ratio | worst label Dice | load (1 min) |", "|---" * 11 + "|"]
    for c in report["cases"]:
        n = c.get("nnunet", {})
        for runtime, o in c["ours"].items():
            if "error" in n or "error" in o:
                lines.append(f"| {c['case']} | {c['size']} | {runtime} | {n.get('error', '')} | "
                             f"{o.get('error', '')} |")
                continue
            worst = min(o["agreement_dice"].values(), default=1.0)
            lines.append(f"| {c['case']} | {'x'.join(map(str, c['input_size']))} | {o['runtime']} | "
                         f"{n['total_s']:.1f} | {o['total_s']:.1f} | {o['time_ratio']:.2f} | "
                         f"{n['peak_rss_mb']:.0f} | {o['peak_rss_mb']:.0f} | {o['memory_ratio']:.2f} | "
                         f"{worst:.4f} | {n['load_average'][0]:.1f} / {o['load_average'][0]:.1f} |")
    return "\n".join(lines)


def benchmark_cli(args) -> int:
    from .runtimes import BF16, installed_runtimes, openvino_has_bf16

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    wanted = getattr(args, "runtimes", "installed")
    # by default every installed runtime, and OpenVINO at bfloat16 where the CPU has it
    runtimes = installed_runtimes() + ([BF16] if openvino_has_bf16() else []) \
        if wanted in (None, "installed") else [r.strip() for r in wanted.split(",") if r.strip()]
    report = run(args.nnunet_folder, args.case, sizes, threads=args.threads,
                 mirror=not args.no_mirror, runtimes=runtimes,
                 log=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in part for c in report["cases"]
                    for part in [c.get("nnunet", {}), *c["ours"].values()]) else 0


if __name__ == "__main__":
    sys.exit(_child())
