"""The network-running half of inference: a model's networks over its own grid.

``NetworkRunner`` loads the networks of one model package once, on one device and runtime, and turns
a prepared (channels, z, y, x) float32 array on the model grid into class probabilities on that
same grid (logits for nnU-Net models, whose windows ``nnunet.run_windows`` runs). It owns:

- sliding windows (MONAI's ``sliding_window_inference``, Gaussian blending), in batches;
- test-time augmentation by flips (``tta``), with left/right label pairs swapped on mirrored passes;
- ensembles: the mean over every member network (and every flip);
- the runtime seam (``runtimes.py``): PyTorch runs the networks, or a compiled window runner does;
- cancel (checked before every batch of windows) and progress ("inference", 0..1);
- the GPU out-of-memory fallback: smaller batches, then stitching on the CPU, then the CPU.

It knows nothing of the input scan's grid: ``inputgrid.py`` takes the probabilities from here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import check_device, check_settings
from .errors import CancelledError, UNetSegError
from .modeldesc import ModelDescription
from .modelpkg import ModelPackage
from .runtimes import WindowRunner, after_scan, check_runtime

ProgressCallback = Callable[[str, float], None]
CancelCallback = Callable[[], bool]


def no_progress(stage: str, fraction: float) -> None:
    """A progress callback that reports nowhere."""


def never_cancelled() -> bool:
    return False


@dataclass(frozen=True)
class WindowSettings:
    """Per-run knobs of the network part, checked when built (``checks.check_settings``)."""

    overlap: float | None = None  # None: the model's own (metadata ``inference.overlap``)
    sw_batch_size: int | None = None  # None: the model's own
    tta: bool = False  # also run the flips the model allows, and average
    mirror: bool = True  # nnU-Net models: mirror over the checkpoint's axes, as nnU-Net does

    def __post_init__(self) -> None:
        check_settings(overlap=self.overlap, sw_batch_size=self.sw_batch_size)


def resolve_device(device: str) -> str:
    """``auto`` to cuda or cpu; refuses cuda without a CUDA device, and unknown names."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UNetSegError("The GPU (CUDA) was asked for, but PyTorch sees no CUDA device. Choose "
                           "the CPU, or install a CUDA build of PyTorch.")
    return device


def count_windows(shape_zyx: Sequence[int], roi_zyx: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window places over ``shape_zyx``."""
    total = 1
    for size, roi in zip(shape_zyx, roi_zyx):
        if size <= roi:  # one window (MONAI pads the image up to the window)
            continue
        step = max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / step) + 1
    return total


class NetworkRunner:
    """The networks of one model, loaded once on ``device`` and ``runtime``, run over its grid.

    Build one per (package, device, runtime); ``with_settings`` gives the same loaded networks with
    other per-run settings. Not for merged nnU-Net packages, which run member by member.
    """

    def __init__(self, package: ModelPackage, device: str, runtime: str = "auto",
                 settings: WindowSettings | None = None) -> None:
        import torch

        from .networks import channels_last_instance_norm, volume_network
        from .packagecheck import build_loaded_networks
        from .runtimes import select_runtime

        desc = package.desc
        if desc.merged:
            raise UNetSegError(f"Model '{desc.id}' merges several models; run it with a Predictor.")
        self.model = package
        self.desc: ModelDescription = desc
        self.device = device
        self.runtime_request = check_runtime(runtime)  # auto, torch, openvino, onnxruntime, ...
        self.settings = settings or WindowSettings()
        dims = desc.network.spatial_dims
        cores = build_loaded_networks(package)
        pristine = [copy.deepcopy(core) for core in cores]  # for exporting: the CPU path edits its norms

        def fresh(index: int) -> Any:
            return volume_network(copy.deepcopy(pristine[index]), dims).eval()

        networks = []
        for core in cores:
            network = volume_network(core, dims).eval().to(device)
            if dims == 3:  # oneDNN (CPU) and cuDNN convolutions run faster channels-last
                network = network.to(memory_format=torch.channels_last_3d)
                # not for nnU-Net models: its rounding flips near-ties away from nnU-Net's labels
                if device == "cpu" and desc.network.framework != "nnunetv2":
                    channels_last_instance_norm(network)
            networks.append(network)
        # the PyTorch networks, one per weights file; empty once a compiled runtime runs the windows
        self.networks: list[Any] = networks
        # what runs the windows (``runtimes.select_runtime``): the networks themselves for PyTorch
        self.runtime, self.window_runners, self.runtime_notes = select_runtime(
            self.runtime_request, device, networks, fresh, [w.sha256 for w in desc.weights],
            list(desc.window_zyx), desc.n_inputs, package.int8_graph)
        if self.runtime != "torch":
            # a compiled runtime runs every window (on the CPU, where there is no out-of-memory
            # fallback to move networks for): the PyTorch copies would only hold the weights' size
            networks.clear()

    def with_settings(self, settings: WindowSettings) -> NetworkRunner:
        """The same loaded networks (shared, not copied) with other per-run settings."""
        other = copy.copy(self)
        other.settings = settings
        return other

    # the settings nnunet.run_windows reads
    @property
    def mirror(self) -> bool:
        return self.settings.mirror

    @property
    def sw_batch_size(self) -> int | None:
        return self.settings.sw_batch_size

    def windows_args(self) -> dict[str, Any]:
        """MONAI ``sliding_window_inference`` arguments: the run's settings, else the model's."""
        own = self.desc.inference
        overlap = self.settings.overlap
        return {
            "roi_size": list(self.desc.window_zyx),
            "overlap": overlap if overlap is not None else own.overlap,
            "sw_batch_size": self.settings.sw_batch_size or own.sw_batch_size,
            "mode": own.blend_mode,
        }

    def probabilities(self, array: np.ndarray, report: ProgressCallback = no_progress,
                      is_cancelled: CancelCallback = never_cancelled,
                      messages: list[str] | None = None) -> tuple[np.ndarray, str]:
        """(class probabilities (C, z, y, x) float32 on the model grid, the device that ran them).

        nnU-Net models give logits instead. Out of GPU memory, it retries with smaller batches, then
        stitching on the CPU, then on the CPU (a note for each goes to ``messages``); the last runs the
        networks on the CPU for this call only, so the runner stays as it was built.
        """
        import torch

        args = self.windows_args()
        attempts = [(self.device, self.device, args["sw_batch_size"])]
        if self.device == "cuda":
            attempts += [("cuda", "cuda", 1), ("cuda", "cpu", 1), ("cpu", "cpu", args["sw_batch_size"])]
        last_error: Exception | None = None
        for i, (sw_device, out_device, batch) in enumerate(attempts):
            try:
                if i > 0:
                    note = (f"GPU out of memory; retrying with window batch {batch}, network on "
                            f"{sw_device}, stitching on {out_device}.")
                    if messages is not None:
                        messages.append(note)
                    report(note, 0.0)
                    if sw_device != self.device:
                        self._move_networks(sw_device)
                probs = self._run_windows(array, dict(args, sw_batch_size=batch), sw_device,
                                          out_device, report, is_cancelled)
                return probs, sw_device
            except torch.cuda.OutOfMemoryError as error:
                last_error = error
                torch.cuda.empty_cache()
            finally:
                if sw_device != self.device:
                    self._move_networks(self.device)
        raise UNetSegError(f"Out of memory even on the CPU ({last_error}). Close other programs or "
                           "use a machine with more memory.")

    def _move_networks(self, device: str) -> None:
        # in place: copies made by ``with_settings`` share this list
        self.networks[:] = [network.to(device) for network in self.networks]

    def _run_windows(self, array: np.ndarray, args: dict[str, Any], sw_device: str, out_device: str,
                     report: ProgressCallback, is_cancelled: CancelCallback) -> np.ndarray:
        if self.desc.nnunet is not None:  # nnU-Net's windows: logits (no MONAI: 173 MB less)
            from . import nnunet

            return nnunet.run_windows(self, array, sw_device, report, is_cancelled)
        import torch
        from monai.inferers import sliding_window_inference

        multilabel = self.desc.multilabel
        # the window runner seam: PyTorch runs the networks (moved by the out-of-memory fallback)
        runners: list[WindowRunner] = self.networks if self.runtime == "torch" else self.window_runners
        flips = self.tta_flips()
        mirror = self.mirror_channels()
        n_windows = count_windows(array.shape[1:], args["roi_size"], args["overlap"])
        calls_per_pass = math.ceil(n_windows / args["sw_batch_size"])
        total_calls = max(1, calls_per_pass * len(flips) * len(runners))
        done = [0]

        def predictor_for(runner: WindowRunner) -> WindowRunner:
            def predictor(x: Any) -> Any:
                if is_cancelled():
                    raise CancelledError()
                out = runner(x)
                done[0] += 1
                report("inference", min(1.0, done[0] / total_calls))
                return out

            return predictor

        x = torch.from_numpy(array)[None].to(sw_device)
        if sw_device == "cuda" and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        summed: torch.Tensor | None = None
        passes = [(member, axes) for member in runners for axes in flips]
        with torch.inference_mode(), torch.autocast("cuda", enabled=sw_device == "cuda"):
            for network, axes in passes:
                xin = torch.flip(x, axes) if axes else x
                out = sliding_window_inference(xin, predictor=predictor_for(network),
                                               sw_device=sw_device, device=out_device, **args)
                assert isinstance(out, torch.Tensor)  # one output head
                logits = out.float()
                if axes:
                    logits = torch.flip(logits, axes)
                if 4 in axes and mirror is not None:  # a right organ came out as its left twin
                    logits = logits[:, mirror]
                probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
                summed = probs if summed is None else summed + probs
        after_scan(runners)
        assert summed is not None
        result = (summed / len(passes))[0]
        return result.cpu().numpy().astype(np.float32, copy=False)

    def tta_flips(self) -> list[tuple[int, ...]]:
        """Tensor dims of (B, C, z, y, x) to flip, one tuple per pass (``()``: no flip)."""
        if not self.settings.tta:
            return [()]
        axis_of = {"z": 2, "y": 3, "x": 4}
        return [()] + [(axis_of[a],) for a in self.desc.inference.tta_flip_axes]

    def mirror_channels(self) -> list[int] | None:
        """Output channel order that swaps left/right label pairs, for left-right flipped inputs.

        The model grid's x axis runs from the patient's right to left (LPS, identity direction), so
        flipping x mirrors the patient and the network reports each paired organ as its twin.
        ``tta_mirror_pairs`` in the model's metadata (written by ``train --mirror-pairs``) names them.
        """
        pairs = self.desc.inference.tta_mirror_pairs
        if not pairs:
            return None
        offset = 0 if self.desc.multilabel else 1
        names = self.desc.label_names
        order = list(range(len(names) + offset))
        for a, b in pairs:
            i, j = names.index(a) + offset, names.index(b) + offset
            order[i], order[j] = j, i
        return order

