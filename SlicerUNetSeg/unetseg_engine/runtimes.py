"""Inference runtimes for the sliding windows: PyTorch, OpenVINO, ONNX Runtime.

The predictor hands each batch of windows, a (B, C, z, y, x) float32 tensor, to a *window runner*:
any callable from such a tensor to the network's logits. Sliding-window blending, flips for TTA,
ensemble averaging, cancel and progress all stay in the predictor, so they work the same on every
runtime. For PyTorch the runner is the network itself.

OpenVINO and ONNX Runtime run an ONNX graph exported from the network the predictor built from the
package's checked weights. The graph is exported on first use and cached in the user's cache folder
(``$UNETSEG_CACHE``, else ``$XDG_CACHE_HOME/unetseg``, else ``~/.cache/unetseg``), keyed by the
weights' SHA-256, the window shape (static; the batch axis is dynamic), the input channels, the
exporter (PyTorch) version and the ONNX opset. Next to each graph a JSON record holds its own SHA-256,
checked before every use as the weights are; a graph that fails the check is exported again.

``auto`` on the CPU picks the fastest installed runtime by timing each on a batch of windows of
this model (measured once per model, window, thread count, CPU and runtime versions, and recorded in
the cache); on CUDA it is PyTorch. A runtime that is not installed or cannot compile the graph gives
one line in the result's messages, and the predictor runs on PyTorch.

``openvino-bf16`` runs the same graph with OpenVINO's bfloat16 inference precision: weights and
activations rounded to bfloat16, sums kept in float32 (on CPUs with native bfloat16 instructions,
AVX512_BF16 or AMX; elsewhere it runs OpenVINO float32 and says so). It is the CPU counterpart of the
reduced precision nnU-Net's own predictor uses on a GPU (``torch.autocast``, float16). ``auto`` never
picks it: like int8, its labels differ slightly from float32's, so it runs only when asked for.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UNetSegError
from .modelpkg import sha256_of
from .outputs import atomic_write

RUNTIMES = ("torch", "openvino", "onnxruntime")
# int8 runs only when asked for, and only for a package holding a graph that passed its gate
# (``quantize.py``): ``auto`` never picks it, since its labels differ slightly from float32's
INT8 = "openvino-int8"
# bfloat16 runs only when asked for too (see the module's docstring)
BF16 = "openvino-bf16"
REDUCED = (INT8, BF16)
RUNTIME_CHOICES = ("auto",) + RUNTIMES + REDUCED
RUNTIME_TITLES = {"torch": "PyTorch", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime",
                  INT8: "OpenVINO int8", BF16: "OpenVINO bfloat16"}
# the Python module each runtime needs (importable without importing it: find_spec)
_MODULES = {"torch": "torch", "openvino": "openvino", "onnxruntime": "onnxruntime"}
OPSET = 17

WindowRunner = Callable[[Any], Any]  # (B, C, z, y, x) float32 torch tensor -> logits tensor


class RuntimeUnavailable(Exception):
    """The runtime is not installed, or could not export or compile the model."""


def check_runtime(name: str) -> str:
    if name not in RUNTIME_CHOICES:
        raise UNetSegError(f"Unknown runtime '{name}': use {', '.join(RUNTIME_CHOICES)}.")
    return name


def installed_runtimes() -> list[str]:
    """The runtimes whose Python package is installed (nothing is imported)."""
    return [name for name in RUNTIMES if importlib.util.find_spec(_MODULES[name]) is not None]


def runtime_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cache_dir() -> Path:
    env = os.environ.get("UNETSEG_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unetseg"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


# ---- the ONNX graph ---------------------------------------------------------------------------
def onnx_graph(make_network: Callable[[], Any], weights_sha256: str, window_zyx: tuple[int, ...],
               in_channels: int) -> Path:
    """The cached ONNX graph of a network (exported now if missing or failing its checksum).

    ``make_network()`` builds the float32 CPU network from the weights whose SHA-256 is given, in
    eval mode and with its original layers (ONNX has its own InstanceNormalization); it is called
    only when the graph has to be exported.
    """
    import torch

    shape = "x".join(str(s) for s in window_zyx)
    key = f"{weights_sha256[:24]}-c{in_channels}-{shape}-torch{torch.__version__}-opset{OPSET}"
    path = cache_dir() / "onnx" / f"{key}.onnx"
    record_path = path.with_suffix(".json")
    record = {"weights_sha256": weights_sha256, "window_zyx": list(window_zyx),
              "in_channels": in_channels, "torch": torch.__version__, "opset": OPSET}
    if path.is_file() and record_path.is_file():
        try:
            stored = json.loads(record_path.read_text())
            if {k: stored.get(k) for k in record} == record and sha256_of(path) == stored.get("sha256"):
                return path
        except (OSError, ValueError):
            pass  # unreadable: export again
    sample = torch.zeros((1, in_channels, *window_zyx))
    buffer = io.BytesIO()
    try:
        network = make_network()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            kwargs: dict[str, Any] = {"input_names": ["x"], "output_names": ["logits"],
                                      "opset_version": OPSET,
                                      "dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}}}
            # torch's annotation says a path, but the exporter writes to any binary file object
            target: Any = buffer
            try:  # the TorchScript exporter: 4 s here against 11 s for the torch.export one
                torch.onnx.export(network, (sample,), target, dynamo=False, **kwargs)
            except TypeError:  # a PyTorch without the ``dynamo`` switch exports this way anyway
                torch.onnx.export(network, (sample,), target, **kwargs)
    except Exception as error:  # noqa: BLE001 - any exporter failure means: run on PyTorch
        raise RuntimeUnavailable(f"the network could not be exported to ONNX ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''})") from error
    data = buffer.getvalue()
    del buffer, network
    release_freed_heap()
    _atomic_write(path, data)
    record["sha256"] = hashlib.sha256(data).hexdigest()
    _atomic_write(record_path, (json.dumps(record, indent=2) + "\n").encode())
    return path


def release_freed_heap() -> bool:
    """Give the memory the C heap holds freed back to the system (glibc's ``malloc_trim``); False
    where there is no glibc. The export's tracing frees a few hundred MB in blocks that would
    otherwise stay in the process: with the shipped model, the resident size after a first load
    that exported fell from 900 to 737 MB (the next Segment's peak hardly moves, 1318 to 1304 MB:
    the exporter's modules stay loaded)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


# ---- runners ----------------------------------------------------------------------------------
def _one_window_at_a_time(run: Callable[[Any], Any], x):
    """Run a (B, C, z, y, x) batch window by window. The compiled runtimes hold their intermediate
    buffers for the batch size they run: for 2 windows of 112 x 64 x 128 OpenVINO's are 160 MB
    larger than for one, and one at a time costs 5 % (0.365 vs 0.345 s per 2 windows on 2 cores)."""
    import numpy as np
    import torch

    array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    outs = [run(array[i:i + 1]) for i in range(array.shape[0])]
    return torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs))


# OpenVINO's intermediate buffers are given back after each scan above this size (``after_scan``);
# the shipped model's (about 150 MB) stay, as reallocating them would cost it 0.2 s a scan.
RELEASE_BUFFERS_MB = 400.0


def process_status_mb(field: str) -> float | None:
    """A memory field of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``: resident size,
    its peak), in MB; None without /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def after_scan(runners) -> None:
    """Tell each window runner that a scan's windows are done (``OpenVINORunner.after_scan``)."""
    for runner in runners:
        hook = getattr(runner, "after_scan", None)
        if hook is not None:
            hook()


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bfloat16 natively here (its ``OPTIMIZATION_CAPABILITIES``
    name BF16 on CPUs with AVX512_BF16 or AMX); False without OpenVINO."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - not installed, or no CPU plugin: no bfloat16 either
        return False


# rt_info that OpenVINO's IR serializer turns into its DisablePrecisionConversion attribute (as
# ov::disable_fp16_compression sets it): the CPU plugin then runs the node at its original float32
# under a bfloat16 inference precision. The attribute takes effect only through an IR: set on a model
# read from ONNX and compiled directly it is ignored.
_KEEP_PRECISION = "precise_0"


def input_convolutions(model) -> list:
    """The convolutions of an OpenVINO model that read the network input itself (through any
    non-convolution ops between): the layers that see the scan's intensities."""
    found, seen = [], set()
    todo = [target.get_node() for parameter in model.get_parameters()
            for target in parameter.output(0).get_target_inputs()]
    while todo:
        node = todo.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() in ("Convolution", "GroupConvolution"):
            found.append(node)
            continue
        todo += [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]
    return found


def _keep_input_convolutions_f32(core, model):
    """``model`` with its input convolutions kept at float32 under bfloat16 (``input_convolutions``),
    made through an IR in a temporary folder (see ``_KEEP_PRECISION``). Writing and reading
    the IR adds about a second to a load: nnU-Net's default network (125 MB of weights) loaded in
    3.9 s on bfloat16 against 2.6 s on float32, on a quiet machine."""
    import tempfile

    import numpy as np
    import openvino as ov

    for node in input_convolutions(model):
        node.get_rt_info()[_KEEP_PRECISION] = ""
    with tempfile.TemporaryDirectory(prefix="unetseg-ov-") as tmp:
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        # read into memory (the weights as one buffer): the folder goes when this returns
        xml = (Path(tmp) / "model.xml").read_bytes()
        weights = ov.Tensor(np.fromfile(Path(tmp) / "model.bin", np.uint8))
    return core.read_model(xml, weights)


class OpenVINORunner:
    """An ONNX graph compiled by OpenVINO for the CPU with a static shape of one window, at float32
    (``precision="f32"``) or bfloat16 (``"bf16"``: only where ``openvino_has_bf16()``).

    Under bfloat16 the convolutions that read the input stay at float32 (``input_convolutions``).
    Rounding the scan's intensities to bfloat16's 8 significant bits was half the logits' error:
    on nnU-Net's default network for OpenKBP, trained briefly, over 10 windows of two scans, the
    relative RMS logit error against float32 fell from 0.0090 to 0.0040 and the foreground voxels
    whose label changed from 0.38 % to 0.26 %, for 3 % more time (1.58 -> 1.63 s a window); keeping
    the last three convolutions instead gave 0.0087, for 43 % more time.
    """

    def __init__(self, graph: Path, threads: int, precision: str = "f32") -> None:
        try:
            import openvino as ov
        except ImportError as error:
            raise RuntimeUnavailable(f"OpenVINO is not installed ({error})") from error
        self.name = BF16 if precision == "bf16" else "openvino"
        self.graph = Path(graph)
        self._core = ov.Core()
        self._config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                        "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision}
        try:
            model = self._core.read_model(str(graph))
            window = [d.get_length() for d in model.input(0).get_partial_shape()[1:]]
            model.reshape({model.input(0): [1] + window})
            if precision == "bf16":
                model = _keep_input_convolutions_f32(self._core, model)
            self._compiled = self._core.compile_model(model, "CPU", self._config)
            self._request = self._compiled.create_infer_request()
        except Exception as error:  # noqa: BLE001
            raise RuntimeUnavailable(f"OpenVINO could not compile the model ({error})") from error
        self._buffers_mb: float | None = None  # what the first window allocated, once measured

    def _run(self, array):
        measure = self._buffers_mb is None
        before = process_status_mb("VmRSS") if measure else None
        out = next(iter(self._request.infer({0: array}, share_inputs=True).values()))
        if measure:
            after = process_status_mb("VmRSS")
            self._buffers_mb = after - before if before is not None and after is not None else 0.0
        return out

    def after_scan(self) -> None:
        """Give back the intermediate buffers when they are large: OpenVINO keeps them between
        windows (the next scan's first window then reallocates them: +0.2 s), and for nnU-Net's
        default network they are 1.1 GB, which the rest of the scan would carry."""
        if self._buffers_mb is not None and self._buffers_mb > RELEASE_BUFFERS_MB:
            self._compiled.release_memory()
            self._buffers_mb = None  # measured again with the next scan

    def __call__(self, x):
        return _one_window_at_a_time(self._run, x)


class OnnxRuntimeRunner:
    """An ONNX graph in ONNX Runtime's CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, graph: Path, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise RuntimeUnavailable(f"ONNX Runtime is not installed ({error})") from error
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001
            raise RuntimeUnavailable(f"ONNX Runtime could not load the model ({error})") from error
        self._input = self._session.get_inputs()[0].name

    def _run(self, array):
        return self._session.run(None, {self._input: array})[0]

    def __call__(self, x):
        return _one_window_at_a_time(self._run, x)


RUNNERS: dict[str, Callable[[Path, int], WindowRunner]] = {"openvino": OpenVINORunner,
                                                           "onnxruntime": OnnxRuntimeRunner}


def build_runner(name: str, make_network: Callable[[], Any], weights_sha256: str, window_zyx,
                 in_channels: int, threads: int) -> WindowRunner:
    """A window runner of the ONNX runtime ``name`` (or ``openvino-bf16``) for one network (see
    ``onnx_graph``).

    Raises RuntimeUnavailable when the runtime is missing or fails to export or compile the model.
    """
    module = _MODULES["openvino" if name == BF16 else name]
    if importlib.util.find_spec(module) is None:
        raise RuntimeUnavailable(f"it is not installed (pip install {module}, or the engine's "
                                 "'fast' extra)")
    graph = onnx_graph(make_network, weights_sha256, tuple(window_zyx), in_channels)
    if name == BF16:
        return OpenVINORunner(graph, threads, precision="bf16")
    return RUNNERS[name](graph, threads)


def select_runtime(requested: str, device: str, networks: list, make_network: Callable[[int], Any],
                   weights_sha256: list[str], window_zyx, in_channels: int,
                   int8_graph: Callable[[], Path | None] | None = None
                   ) -> tuple[str, list[WindowRunner], list[str]]:
    """(runtime, one window runner per network, notes for the user) for a loaded model.

    ``networks`` are the PyTorch networks, ready to run on ``device``; ``make_network(i)`` builds
    network i afresh for export. PyTorch is the answer on CUDA, when asked for, and when the runtime
    asked for is missing or fails (then a note says so, in one line). ``int8_graph()`` gives the
    package's checked int8 graph, or None; without one, ``openvino-int8`` runs OpenVINO float32.
    """
    import torch

    check_runtime(requested)
    notes: list[str] = []
    if requested == BF16 and device == "cpu" and not openvino_has_bf16():
        if importlib.util.find_spec("openvino") is not None:
            notes.append("This CPU has no native bfloat16 (AVX512_BF16 or AMX) for OpenVINO; running "
                         "OpenVINO float32.")
        requested = "openvino"  # (without OpenVINO, the lines below say so and run PyTorch)
    if requested == INT8 and device == "cpu":
        graph = int8_graph() if int8_graph is not None else None
        if graph is None:
            notes.append("This model has no int8 graph (see 'unetseg quantize'); running OpenVINO "
                         "float32.")
            requested = "openvino"
        else:
            try:
                if importlib.util.find_spec("openvino") is None:
                    raise RuntimeUnavailable("OpenVINO is not installed")
                return INT8, [OpenVINORunner(graph, torch.get_num_threads())], notes
            except RuntimeUnavailable as error:
                notes.append(f"{RUNTIME_TITLES[INT8]} is not available: {error}; running on PyTorch.")
                return "torch", list(networks), notes
    if requested == "torch" or device != "cpu":
        if requested not in ("torch", "auto"):
            notes.append(f"{RUNTIME_TITLES[requested]} runs on the CPU only here; running on PyTorch "
                         f"({device}).")
        return "torch", list(networks), notes
    wanted = [n for n in installed_runtimes() if n != "torch"] if requested == "auto" else [requested]
    threads = torch.get_num_threads()
    built: dict[str, list[WindowRunner]] = {"torch": list(networks)}
    for name in wanted:
        try:
            built[name] = [build_runner(name, functools.partial(make_network, i), weights_sha256[i],
                                        window_zyx, in_channels, threads) for i in range(len(networks))]
        except RuntimeUnavailable as error:
            notes.append(f"{RUNTIME_TITLES[name]} is not available: {error}; running on PyTorch.")
    if requested == "auto" and len(built) > 1:
        # timed on one window: the compiled runtimes run windows one at a time anyway, and the
        # first load pays for it (about 2.5 s for the three runtimes on 2 cores)
        name, _ = choose_auto({n: r[0] for n, r in built.items()}, "+".join(weights_sha256),
                              window_zyx, in_channels, 1, threads)
        return name, built[name], notes
    if requested in built:
        return requested, built[requested], notes
    return "torch", built["torch"], notes


# ---- auto: measure ----------------------------------------------------------------------------
def _choice_path(weights_sha256: str, window_zyx, batch: int, threads: int) -> Path:
    versions = "-".join(f"{n}{runtime_version(n)}" for n in RUNTIMES)
    machine = f"{platform.machine()}-{platform.processor() or platform.node()}-{os.cpu_count()}"
    key = hashlib.sha256(f"{weights_sha256}|{list(window_zyx)}|{batch}|{threads}|{versions}|{machine}"
                         .encode()).hexdigest()[:32]
    return cache_dir() / "auto" / f"{key}.json"


def fastest(runners: dict[str, WindowRunner], sample, rounds: int = 1) -> tuple[str, dict[str, float]]:
    """The runner with the shortest time on ``sample`` (after one warm-up call each; best of
    ``rounds`` rounds, the runners alternating so that load on a shared machine hits them alike)."""
    import torch

    best: dict[str, float] = {}
    with torch.inference_mode():
        for runner in runners.values():
            runner(sample)
        for _ in range(rounds):
            for name, runner in runners.items():
                t = time.perf_counter()
                runner(sample)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return min(best, key=best.__getitem__), best


def choose_auto(runners: dict[str, WindowRunner], weights_sha256: str, window_zyx, in_channels: int,
                batch: int, threads: int) -> tuple[str, dict[str, float] | None]:
    """The fastest of ``runners`` for this model and machine: measured once, then read back."""
    import torch

    path = _choice_path(weights_sha256, window_zyx, batch, threads)
    with contextlib.suppress(OSError, ValueError, KeyError):
        stored = json.loads(path.read_text())
        if stored["runtime"] in runners and set(stored["times_s"]) == set(runners):
            return stored["runtime"], None
    sample = torch.randn((batch, in_channels, *window_zyx), generator=torch.Generator().manual_seed(0))
    name, times = fastest(runners, sample)
    with contextlib.suppress(OSError):
        _atomic_write(path, json.dumps({"runtime": name, "times_s": times, "batch": batch,
                                        "threads": threads}).encode())
    return name, times
