"""Text and small choices of the panel, kept out of the widget so they are testable without Qt."""

from __future__ import annotations

import html
import re
from typing import Any

from unetseg_engine.checks import DEVICES

# (name, level, width); "Model default" is filled from the selected model.
WINDOW_PRESETS = [("Soft tissue", 40.0, 400.0), ("Lung", -600.0, 1500.0), ("Bone", 400.0, 1800.0),
                  ("Brain", 40.0, 80.0)]
DEVICE_TITLES = {"auto": "Auto (GPU if available)", "cuda": "GPU (CUDA)", "cpu": "CPU"}
DEVICE_CHOICES = [(DEVICE_TITLES[device], device) for device in DEVICES]
RUN_ON_CHOICES = [("This computer", "local"), ("A server", "server")]
# Slicer's settings (qt.QSettings), not the parameter node: a token must never be saved with a scene
SETTINGS_RUN_ON, SETTINGS_SERVER_URL, SETTINGS_SERVER_TOKEN = (
    "SlicerUNetSeg/RunOn", "SlicerUNetSeg/ServerURL", "SlicerUNetSeg/ServerToken")
RUNTIME_CHOICES = [("Auto (fastest installed)", "auto"), ("PyTorch", "torch"), ("OpenVINO", "openvino"),
                   ("ONNX Runtime", "onnxruntime"),
                   ("OpenVINO int8 (models that have it)", "openvino-int8"),
                   ("OpenVINO bfloat16 (CPUs that have it)", "openvino-bf16")]


def runtimeTitle(runtime: str | None) -> str:
    """The name of the runtime that ran the network, as the runtime combo box shows it."""
    return dict((v, t) for t, v in RUNTIME_CHOICES[1:]).get(runtime or "torch", str(runtime))


def modelInfoHtml(summary: dict[str, Any]) -> str:
    """Title, version, description, inputs, labels, licence and expected run time of a model."""
    def esc(value) -> str:
        return html.escape(str(value))

    runtime = summary.get("expected_runtime") or {}
    if isinstance(runtime, dict):
        runtimeText = ", ".join(f"{esc(k[:-2].upper())} ~{v:g} s" if k.endswith("_s") and
                                isinstance(v, (int, float)) else f"{esc(k)}: {esc(v)}"
                                for k, v in runtime.items()) or "not stated"
    else:
        runtimeText = esc(runtime)
    window = summary.get("default_window")
    windowText = f"level {window[0]:g}, width {window[1]:g}" if window else "none (intensity normalised)"
    rows = [
        f"<b>{esc(summary['title'])}</b> &nbsp;<i>v{esc(summary['version'])}</i> "
        f"({esc(summary['modality'])})",
        esc(summary["description"]),
        f"<b>Inputs:</b> {esc(', '.join(summary['inputs']))}",
        f"<b>Labels ({len(summary['labels'])}):</b> {esc(', '.join(summary['labels']))}",
        f"<b>Window:</b> {windowText}",
        f"<b>Licence:</b> {esc(summary['licence'])}",
        f"<b>Expected run time:</b> {runtimeText}",
    ]
    if summary.get("performance"):
        rows.append(f"<b>Performance:</b> {esc(summary['performance'])}")
    return "<br>".join(rows)


def matchVolumesToChannels(channelNames: list[str], volumes: list[tuple[str, Any]],
                           current: list[Any] | None = None) -> list[Any]:
    """Pick a volume for each model channel by name ('T1', 'FLAIR', ...); keeps current choices that
    still fit and falls back to the order of the volumes. ``volumes`` is [(name, node)]."""
    current = list(current or [])
    chosen: list[Any] = []
    for index, channel in enumerate(channelNames):
        key = re.sub(r"[^a-z0-9]", "", channel.lower())
        named = [node for name, node in volumes if key and key in re.sub(r"[^a-z0-9]", "", name.lower())
                 and node not in chosen]
        keep = current[index] if index < len(current) and current[index] is not None else None
        if named:
            chosen.append(keep if keep in named else named[0])
        elif keep is not None and keep not in chosen:
            chosen.append(keep)
        else:
            rest = [node for _, node in volumes if node not in chosen]
            chosen.append(rest[0] if rest else None)
    return chosen


def environmentText(torchVersion: str | None, cudaVersion: str | None, hello: dict | None) -> str:
    """The device line: PyTorch and CUDA versions, and the detected device once the worker said."""
    if hello and hello.get("torch"):
        device = f"GPU {hello['gpu_name']}" if hello.get("cuda_available") else "CPU (no CUDA GPU found)"
        return f"PyTorch {hello['torch']}, CUDA {hello.get('cuda') or 'none'}; detected device: {device}"
    if torchVersion is None:
        return "PyTorch is not installed yet; it is installed on the first Segment (PyTorch extension)."
    return (f"PyTorch {torchVersion}, CUDA {cudaVersion or 'none (CPU build)'}; the device is detected on "
            "the first Segment")


def serverText(url: str, environment: dict | None) -> str:
    """The device line when running on a server: where, and what it runs on."""
    if not environment or not environment.get("torch"):
        return f"Server {url}"
    device = f"GPU {environment['gpu_name']}" if environment.get("cuda_available") else "CPU"
    workers = environment.get("workers")
    return (f"Server {url}: PyTorch {environment['torch']} on {device}"
            + (f", {workers} worker(s)" if workers else ""))


def timingSummary(timings: dict[str, float], warm: bool) -> str:
    order = ["write_input_s", "upload_s", "read_s", "load_model_s", "preprocess_s", "inference_s",
             "resample_s", "write_s", "download_s", "build_segmentation_s"]
    parts = [f"{key[:-2].replace('_', ' ')} {timings[key]:.2f}s" for key in order if key in timings]
    state = "warm: model already loaded" if warm else "cold: model loaded"
    return f"Total {timings.get('total_s', 0):.1f} s ({state}); " + ", ".join(parts)
