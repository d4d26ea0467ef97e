"""Sliding-window U-Net inference, from input volumes to labels on exactly the input's grid.

``Predictor`` follows nnU-Net's three phases: construct it with runtime knobs (device, overlap, ...),
``load`` a model package once (it stays warm for later calls), then ``predict`` any number of scans.
An ensemble package loads one network per member; its class probabilities are the mean over members
(and over flips with ``tta``).

Geometry: the scan is resampled once onto the model grid (``preprocess.prepare``); class probabilities
come back onto the input grid by linear interpolation, only inside the box where some organ has a
probability above ``REGION_THRESHOLD`` (elsewhere background wins the argmax anyway, because linear
interpolation is a convex combination). So a 4 mm model gives smooth boundaries on a 0.8 mm scan
without a float copy of every class at full resolution. For the same reason, a voxel whose 8
surrounding model voxels share their most probable class takes that class without interpolating
anything; only voxels on organ boundaries are interpolated (``Predictor._argmax_on``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np
import SimpleITK as sitk

from .checks import check_settings, check_volume, modality_warnings
from .errors import CancelledError, UNetSegError
from .modelpkg import ModelPackage, get_model
from .postprocess import clean_mask, postprocess_label_map
from .preprocess import Box, box_reference, prepare

ProgressCallback = Callable[[str, float], None]
CancelCallback = Callable[[], bool]
REGION_THRESHOLD = 0.01
# Above this fraction of boundary voxels (a noisy, untrained network) ``_argmax_on`` interpolates
# every class at every voxel instead, which then costs less.
MIXED_FRACTION_LIMIT = 0.15


@dataclass
class SegmentationResult:
    """Labels on the first input's grid.

    ``label_map``: one label per voxel (uint8, or uint16 past 255 labels). For multi-label models,
    ``masks`` holds each label's own (possibly overlapping) mask as ``(box, bool array (k, j, i))``,
    and ``label_map`` resolves overlaps to the most probable label.
    """

    label_map: sitk.Image
    model: ModelPackage
    masks: dict[int, tuple[Box, np.ndarray]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    messages: list[str] = field(default_factory=list)
    runtime: str = "torch"  # which ran the network: torch, openvino or onnxruntime
    # per label: volume, confidence, flags, where to look first (``review.build_review``)
    review: list[dict] | None = None
    # uint8 uncertainty on the first input's grid, when asked for (``Predictor(uncertainty=True)``)
    uncertainty: sitk.Image | None = None

    def label_mask(self, value: int) -> tuple[Box, np.ndarray]:
        """One label's mask as (box, bool array) in the input's index space."""
        if self.masks is not None:
            return self.masks[value]
        array = sitk.GetArrayViewFromImage(self.label_map)
        from .postprocess import bounding_box

        box = bounding_box(array == value, margin=0)
        if box is None:
            return Box((0, 0, 0), (0, 0, 0)), np.zeros((0, 0, 0), bool)
        start = tuple(int(s.start) for s in box[::-1])
        size = tuple(int(s.stop - s.start) for s in box[::-1])
        return Box(start, size), array[box] == value  # type: ignore[arg-type]


def _count_windows(shape_zyx, roi_zyx, overlap: float) -> int:
    total = 1
    for size, roi in zip(shape_zyx, roi_zyx):
        if size <= roi:  # one window (MONAI pads the image up to the window)
            continue
        step = max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / step) + 1
    return total


def _axis_aligned(to_model: np.ndarray) -> list[int] | None:
    """For each input axis, the model axis it runs along, if the grids are axis-aligned (else None)."""
    axes = [int(np.argmax(np.abs(to_model[:, a]))) for a in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    off = np.abs(to_model).copy()
    for a, p in enumerate(axes):
        off[p, a] = 0.0
    return axes if off.max() <= 1e-9 * np.abs(to_model).max() else None


def _argmax_first_axis(stack: np.ndarray, dtype) -> np.ndarray:
    """``np.argmax(stack, axis=0)`` (ties to the lower index), one contiguous pass per channel.

    Much faster than numpy's strided reduction over the first axis of a (C, ...) array.
    """
    best = stack[0].copy()
    index = np.zeros(best.shape, dtype)
    for c in range(1, stack.shape[0]):
        take = stack[c] > best
        np.copyto(best, stack[c], where=take)
        index[take] = c
    return index


class Predictor:
    """Runs one model on scans; reuse it to keep the network loaded (the Slicer module does)."""

    def __init__(self, device: str = "auto", overlap: float | None = None,
                 sw_batch_size: int | None = None, tta: bool = False, postprocess: bool = True,
                 num_threads: int | None = None, runtime: str = "auto",
                 uncertainty: bool = False, mirror: bool = True) -> None:
        import torch

        from .runtimes import check_runtime

        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise UNetSegError("The GPU (CUDA) was asked for, but PyTorch sees no CUDA device. Choose "
                               "the CPU, or install a CUDA build of PyTorch.")
        if device not in ("cpu", "cuda"):
            raise UNetSegError(f"Unknown device '{device}': use auto, cpu or cuda.")
        check_settings(overlap=overlap, sw_batch_size=sw_batch_size)
        self.device = device
        self.runtime_request = check_runtime(runtime)  # auto, torch, openvino, onnxruntime
        self.runtime = "torch"  # what runs the windows once loaded (``runtimes.select_runtime``)
        self.window_runners: list = []
        self.runtime_notes: list[str] = []
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.tta = tta
        self.mirror = mirror  # nnU-Net models: mirror over the checkpoint's axes, as nnU-Net does
        self.postprocess = postprocess
        self.uncertainty = uncertainty  # also bring back the uncertainty map (review.uncertainty_map)
        self.model: ModelPackage | None = None
        self.members: list = []
        self.networks: list = []  # one per weights file (several for an ensemble)

    # ---- phase 2: load ------------------------------------------------------------------------
    def load(self, model: ModelPackage | str | None = None) -> ModelPackage:
        """Build the network(s) and load checked weights; a no-op if this model is already loaded."""
        import copy

        import torch

        from .networks import channels_last_instance_norm, volume_network
        from .packagecheck import build_loaded_networks
        from .runtimes import select_runtime

        package = model if isinstance(model, ModelPackage) else get_model(model)
        if self.has_loaded(package):
            return self.model
        self.members = []  # several nnU-Net models merged: one predictor each (nnunet.predict_merged)
        if "merge" in package.meta:
            self.model, self.networks = package, []
            return package
        net = package.meta["network"]
        cores = build_loaded_networks(package)
        pristine = [copy.deepcopy(core) for core in cores]  # for exporting: the CPU path edits its norms

        def fresh(index: int):
            return volume_network(copy.deepcopy(pristine[index]), net["spatial_dims"]).eval()

        networks = []
        for core in cores:
            network = volume_network(core, net["spatial_dims"]).eval().to(self.device)
            if net["spatial_dims"] == 3:  # oneDNN (CPU) and cuDNN convolutions run faster channels-last
                network = network.to(memory_format=torch.channels_last_3d)
                # not for nnU-Net models: its rounding flips near-ties away from nnU-Net's labels
                if self.device == "cpu" and net.get("framework") != "nnunetv2":
                    channels_last_instance_norm(network)
            networks.append(network)
        self.runtime, self.window_runners, self.runtime_notes = select_runtime(
            self.runtime_request, self.device, networks, fresh,
            [w["sha256"] for w in package.weight_files], self._windows_args(package)["roi_size"],
            len(package.meta["inputs"]), package.int8_graph)
        self.networks = networks
        self.model = package
        return package

    def has_loaded(self, package: ModelPackage) -> bool:
        """Whether ``package`` (same folder, same weights) is the model already loaded."""
        return self.model is not None and self.model.path == package.path and \
            self.model.weights_key == package.weights_key

    # ---- phase 3: predict ---------------------------------------------------------------------
    def predict(self, images: list[sitk.Image], window: tuple[float, float] | None = None,
                progress: ProgressCallback | None = None,
                cancel: CancelCallback | None = None) -> SegmentationResult:
        """Segment one scan (one image per model input channel); returns labels on images[0]'s grid."""
        if self.model is None:
            self.load()
        model = self.model
        assert model is not None
        if "merge" in model.meta:
            from .nnunet import predict_merged

            return predict_merged(self, images, progress, cancel)
        n_inputs = len(model.meta["inputs"])
        if len(images) != n_inputs:
            names = ", ".join(i["name"] for i in model.meta["inputs"])
            raise UNetSegError(f"Model '{model.id}' takes {n_inputs} input volume(s) ({names}); "
                               f"{len(images)} were given.")
        for i, image in enumerate(images):
            check_volume(image, f"input volume {i + 1}")
        check_settings(window=window)
        report = progress or (lambda stage, fraction: None)
        is_cancelled = cancel or (lambda: False)
        timings: dict[str, float] = {}
        messages = modality_warnings(images, model.meta["modality"]) + list(self.runtime_notes)

        t = time.perf_counter()
        report("preprocessing", 0.0)
        if "nnunet" in model.meta:  # nnU-Net's own preprocessing (nnunet.py)
            from . import nnunet

            prepared = nnunet.prepare(images, model.meta["nnunet"])
        else:
            prepared = prepare(images, model.meta["preprocessing"], window)
        timings["preprocess_s"] = time.perf_counter() - t
        if is_cancelled():
            raise CancelledError()

        t = time.perf_counter()
        ran_on: list[str] = []
        probs = self._infer(prepared.array, report, is_cancelled, messages, ran_on)
        timings["inference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        report("resampling to the input grid", 0.0)
        label_map, masks = self._to_input_grid(probs, prepared, is_cancelled)
        timings["resample_s"] = time.perf_counter() - t

        t = time.perf_counter()
        review_entries, uncertainty = self._review(probs, prepared, label_map, masks)
        timings["review_s"] = time.perf_counter() - t
        report("done", 1.0)
        return SegmentationResult(label_map, model, masks, timings, ran_on[0] if ran_on else self.device,
                                  messages, self.runtime, review_entries, uncertainty)

    def _review(self, probs, prepared, label_map, masks):
        """Confidence, flags and (when asked for) the uncertainty map: ``review.py``."""
        from .review import build_review, uncertainty_map

        model = self.model
        if "nnunet" in model.meta:  # nnU-Net's windows give logits; the review reads probabilities
            import torch

            probs = torch.softmax(torch.from_numpy(np.asarray(probs, np.float32)), 0).numpy()
        entries = build_review(probs, prepared, model, label_map, masks)
        if not self.uncertainty:
            return entries, None
        channels = range(probs.shape[0]) if model.multilabel else range(1, probs.shape[0])
        return entries, uncertainty_map(probs, prepared, model, self._region_box(probs, prepared, channels))

    def _windows_args(self, model: ModelPackage | None = None) -> dict[str, Any]:
        meta = (model or self.model).meta["inference"]  # type: ignore[union-attr]
        nnunet = (model or self.model).meta.get("nnunet")  # type: ignore[union-attr]
        return {
            "roi_size": list(nnunet["patch_size"]) if nnunet else list(reversed(meta["patch_size"])),
            "overlap": self.overlap if self.overlap is not None else meta.get("overlap", 0.5),
            "sw_batch_size": self.sw_batch_size or meta.get("sw_batch_size", 2),
            "mode": meta.get("blend_mode", "gaussian"),
        }

    def _infer(self, array: np.ndarray, report: ProgressCallback, is_cancelled: CancelCallback,
               messages: list[str], ran_on: list[str] | None = None) -> np.ndarray:
        """Class probabilities (C, z, y, x) float32 on the model grid; falls back when out of memory.

        The device the networks ran on is appended to ``ran_on``. The last fallback runs them on the
        CPU for this call only: they go back to ``self.device`` afterwards, so the predictor stays as
        it was built (the worker keeps it warm for the next scan).
        """
        import torch

        args = self._windows_args()
        attempts = [(self.device, self.device, args["sw_batch_size"])]
        if self.device == "cuda":
            attempts += [("cuda", "cuda", 1), ("cuda", "cpu", 1), ("cpu", "cpu", args["sw_batch_size"])]
        last_error: Exception | None = None
        for i, (sw_device, out_device, batch) in enumerate(attempts):
            try:
                if i > 0:
                    note = (f"GPU out of memory; retrying with window batch {batch}, network on "
                            f"{sw_device}, stitching on {out_device}.")
                    messages.append(note)
                    report(note, 0.0)
                    if sw_device != self.device:
                        self._move_networks(sw_device)
                probs = self._run_windows(array, dict(args, sw_batch_size=batch), sw_device,
                                          out_device, report, is_cancelled)
                if ran_on is not None:
                    ran_on.append(sw_device)
                return probs
            except torch.cuda.OutOfMemoryError as error:
                last_error = error
                torch.cuda.empty_cache()
            finally:
                if sw_device != self.device:
                    self._move_networks(self.device)
        raise UNetSegError(f"Out of memory even on the CPU ({last_error}). Close other programs or "
                           "use a machine with more memory.")

    def _move_networks(self, device: str) -> None:
        self.networks = [network.to(device) for network in self.networks]

    def _run_windows(self, array, args, sw_device, out_device, report, is_cancelled) -> np.ndarray:
        import torch
        from monai.inferers import sliding_window_inference

        if "nnunet" in self.model.meta:  # type: ignore[union-attr]  # nnU-Net's windows: logits
            from . import nnunet

            return nnunet.run_windows(self, array, sw_device, report, is_cancelled)
        multilabel = self.model.multilabel  # type: ignore[union-attr]
        # the window runner seam: PyTorch runs the networks (moved by the out-of-memory fallback)
        runners = self.networks if self.runtime == "torch" else self.window_runners
        flips = self._tta_flips()
        mirror = self._mirror_channels()
        n_windows = _count_windows(array.shape[1:], args["roi_size"], args["overlap"])
        calls_per_pass = math.ceil(n_windows / args["sw_batch_size"])
        total_calls = max(1, calls_per_pass * len(flips) * len(runners))
        done = [0]

        def predictor_for(runner):
            def predictor(x):
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
        summed = None
        passes = [(member, axes) for member in runners for axes in flips]
        with torch.inference_mode(), torch.autocast("cuda", enabled=sw_device == "cuda"):
            for network, axes in passes:
                xin = torch.flip(x, axes) if axes else x
                logits = sliding_window_inference(xin, predictor=predictor_for(network),
                                                  sw_device=sw_device, device=out_device, **args)
                logits = logits.float()
                if axes:
                    logits = torch.flip(logits, axes)
                if 4 in axes and mirror is not None:  # a right organ came out as its left twin
                    logits = logits[:, mirror]
                probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
                summed = probs if summed is None else summed + probs
        result = (summed / len(passes))[0]
        return result.cpu().numpy().astype(np.float32, copy=False)

    def _tta_flips(self) -> list[tuple[int, ...]]:
        if not self.tta:
            return [()]
        axis_of = {"z": 2, "y": 3, "x": 4}  # tensor dims of (B, C, z, y, x)
        allowed = self.model.meta["inference"].get("tta_flip_axes", [])  # type: ignore[union-attr]
        return [()] + [(axis_of[a],) for a in allowed]

    def _mirror_channels(self) -> list[int] | None:
        """Output channel order that swaps left/right label pairs, for left-right flipped inputs.

        The model grid's x axis runs from the patient's right to left (LPS, identity direction), so
        flipping x mirrors the patient and the network reports each paired organ as its twin.
        ``tta_mirror_pairs`` in the model's metadata (written by ``train --mirror-pairs``) names them.
        """
        model = self.model
        pairs = model.meta["inference"].get("tta_mirror_pairs")  # type: ignore[union-attr]
        if not pairs:
            return None
        offset = 0 if model.multilabel else 1  # type: ignore[union-attr]
        names = model.label_names  # type: ignore[union-attr]
        order = list(range(len(names) + offset))
        for a, b in pairs:
            i, j = names.index(a) + offset, names.index(b) + offset
            order[i], order[j] = j, i
        return order

    # ---- back to the input grid ---------------------------------------------------------------
    def _region_box(self, probs: np.ndarray, prepared, channels) -> Box | None:
        """The input-index box covering model-grid voxels where any of ``channels`` is plausible."""
        if "nnunet" in self.model.meta:  # type: ignore[union-attr]  # logits: where an organ wins
            from .nnunet import foreground_mask

            mask = foreground_mask(probs)
        else:
            mask = np.zeros(probs.shape[1:], bool)
            for c in channels:
                mask |= probs[c] > REGION_THRESHOLD
        if not mask.any():
            return None
        lo, hi = [], []
        for axis in range(3):
            nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            lo.append(nz[0] - 1)
            hi.append(nz[-1] + 1)
        grid, reference = prepared.grid, prepared.reference
        corners_kji = product(*[(a, b) for a, b in zip(lo, hi)])
        indices = []
        for k, j, i in corners_kji:
            point = grid.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])
            indices.append(reference.TransformPhysicalPointToContinuousIndex(point))
        indices = np.array(indices)
        size = np.array(reference.GetSize())
        start = np.clip(np.floor(indices.min(axis=0)).astype(int) - 1, 0, size)
        stop = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 2, 0, size)
        box_start = np.maximum(start, prepared.box.start)
        box_stop = np.minimum(stop, np.array(prepared.box.start) + np.array(prepared.box.size))
        if np.any(box_stop <= box_start):
            return None
        return Box(tuple(int(v) for v in box_start), tuple(int(v) for v in box_stop - box_start))

    def _channel_on(self, probs: np.ndarray, c: int, prepared, ref: sitk.Image, default: float):
        image = sitk.GetImageFromArray(probs[c])
        image.CopyInformation(prepared.grid)
        resampled = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, default,
                                  sitk.sitkFloat32)
        # a copy: a view would dangle once ``resampled`` is freed at return
        return sitk.GetArrayFromImage(resampled)

    def _argmax_on(self, probs: np.ndarray, prepared, ref: sitk.Image,
                   is_cancelled: CancelCallback) -> np.ndarray:
        """The class index (k, j, i) of the largest linearly interpolated probability at ``ref``'s voxels.

        The same result as interpolating every class onto ``ref`` and taking the argmax (ties to the
        lower class), at a fraction of the cost: interpolation is a convex combination of the 8 model
        voxels around a point, so where those 8 share their argmax, the interpolated argmax is that
        class too. One nearest-neighbour resampling of the model grid's cells (uint8) labels all such
        voxels; only voxels in cells whose corners disagree (organ boundaries) are interpolated.
        """
        from scipy import ndimage

        n_classes = probs.shape[0]
        small = np.uint8 if n_classes < 255 else np.uint16
        mixed = n_classes  # marks cells whose 8 corners disagree
        top = _argmax_first_axis(probs, small)
        # Edge-replicated, as the linear interpolator clamps at the border: cell (z, y, x) of the padded
        # grid spans model indices [z - 1, z] x [y - 1, y] x [x - 1, x].
        padded = np.pad(top, 1, mode="edge")
        cells = padded[:-1, :-1, :-1].copy()
        same = np.ones(cells.shape, bool)
        for dz, dy, dx in product((0, 1), repeat=3):
            if dz or dy or dx:
                same &= padded[dz:dz + cells.shape[0], dy:dy + cells.shape[1],
                               dx:dx + cells.shape[2]] == cells
        cells[~same] = mixed
        del same, padded
        grid = prepared.grid
        # Input index (i, j, k) -> model continuous index (x, y, z): origin + to_model @ (i, j, k).
        to_physical = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
        to_model = np.linalg.inv(np.array(grid.GetDirection()).reshape(3, 3) *
                                 np.array(grid.GetSpacing())) @ to_physical
        origin = np.array(grid.TransformPhysicalPointToContinuousIndex(ref.GetOrigin()))
        axes = _axis_aligned(to_model)
        if axes is not None:
            # Each input axis runs along one model axis: the cell of every voxel is a separable lookup
            # (nearest cell centre, as the nearest-neighbour resampling below would pick).
            size = ref.GetSize()
            along = [origin[axes[a]] + to_model[axes[a], a] * np.arange(size[a]) for a in range(3)]
            lookup: list[Any] = [None, None, None]  # per model axis x, y, z
            for a in range(3):
                p = axes[a]
                cell = np.clip(np.floor(along[a] + 1.0), 0, cells.shape[2 - p] - 1).astype(np.intp)
                lookup[p] = cell.reshape([-1 if d == 2 - a else 1 for d in range(3)])
            out = cells[lookup[2], lookup[1], lookup[0]]
        else:
            cell_image = sitk.GetImageFromArray(cells)
            cell_image.SetSpacing(grid.GetSpacing())
            cell_image.SetDirection(grid.GetDirection())
            cell_image.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
            pixel = sitk.sitkUInt8 if small is np.uint8 else sitk.sitkUInt16
            out = sitk.GetArrayFromImage(sitk.Resample(cell_image, ref, sitk.Transform(),
                                                       sitk.sitkNearestNeighbor, 0.0, pixel))
        del cells
        if is_cancelled():
            raise CancelledError()
        kji = np.nonzero(out == mixed)
        # a noisy model: interpolate every class (not for nnU-Net's logits, which clamp at the edges)
        if kji[0].size > MIXED_FRACTION_LIMIT * out.size and "nnunet" not in self.model.meta:
            del kji
            return self._argmax_resampled(probs, prepared, ref, is_cancelled, out)
        if kji[0].size:
            # Model-grid continuous indices of those voxels, clamped as the linear interpolator does.
            shape_xyz = probs.shape[1:][::-1]
            coords = []
            for p in (2, 1, 0):  # model z, y, x, as the (C, z, y, x) array is indexed
                if axes is not None:
                    a = axes.index(p)
                    c = along[a][kji[2 - a]]
                else:
                    row = to_model[p]
                    c = origin[p] + row[0] * kji[2] + row[1] * kji[1] + row[2] * kji[0]
                np.clip(c, 0, shape_xyz[p] - 1, out=c)
                coords.append(c)
            scores = np.empty((n_classes, kji[0].size), np.float32)
            for c in range(n_classes):
                ndimage.map_coordinates(probs[c], coords, output=scores[c], order=1, mode="nearest",
                                        prefilter=False)
            out[kji] = _argmax_first_axis(scores, small)
        return out

    def _classes_on(self, probs, prepared, ref, is_cancelled) -> np.ndarray:
        """``_argmax_on``, or for nnU-Net models exported with a separate low-resolution axis, nnU-Net's
        own resampling of the logits (``nnunet.export_separate_z``)."""
        section = self.model.meta.get("nnunet")  # type: ignore[union-attr]
        if section is None:
            return self._argmax_on(probs, prepared, ref, is_cancelled)
        from . import nnunet

        if nnunet.needs_separate_z_export(prepared, section) is None:
            return self._argmax_on(probs, prepared, ref, is_cancelled)
        classes = nnunet.export_separate_z(probs, prepared, section, is_cancelled)
        start = np.array(ref.GetOrigin())  # the region box, in the crop box's index space
        offset = np.rint(prepared.reference.TransformPhysicalPointToContinuousIndex(start)).astype(int)
        offset = offset - np.array(prepared.box.start)
        size = ref.GetSize()
        return classes[tuple(slice(o, o + n) for o, n in zip(offset[::-1], size[::-1]))]

    def _argmax_resampled(self, probs, prepared, ref, is_cancelled, out: np.ndarray) -> np.ndarray:
        """``_argmax_on`` by resampling every class onto ``ref`` (into ``out``, reused)."""
        best_p = self._channel_on(probs, 0, prepared, ref, 1.0)
        out[...] = 0
        for c in range(1, probs.shape[0]):
            if is_cancelled():
                raise CancelledError()
            p = self._channel_on(probs, c, prepared, ref, 0.0)
            take = p > best_p
            best_p[take] = p[take]
            out[take] = c
        return out

    def _to_input_grid(self, probs, prepared, is_cancelled):
        model = self.model
        assert model is not None
        reference = prepared.reference
        values = [label["value"] for label in model.labels]
        dtype = np.uint8 if max(values) < 256 else np.uint16
        size_kji = reference.GetSize()[::-1]
        label_map = np.zeros(size_kji, dtype)
        spacing = reference.GetSpacing()
        voxel_mm3 = float(np.prod(spacing))
        masks: dict[int, tuple[Box, np.ndarray]] | None = None
        if model.multilabel:
            masks = {}
            threshold = model.meta["output"].get("threshold", 0.5)
            best_score: np.ndarray | None = None  # float16 is plenty to rank overlapping labels
            for c, label in enumerate(model.labels):
                if is_cancelled():
                    raise CancelledError()
                box = self._region_box(probs, prepared, [c])
                if box is None:
                    masks[label["value"]] = (Box((0, 0, 0), (0, 0, 0)), np.zeros((0, 0, 0), bool))
                    continue
                p = self._channel_on(probs, c, prepared, box_reference(reference, box), 0.0)
                mask = p > threshold
                if self.postprocess and label.get("postprocessing"):
                    mask = clean_mask(mask, label["postprocessing"], voxel_mm3)
                masks[label["value"]] = (box, mask)
                if best_score is None:
                    best_score = np.zeros(size_kji, np.float16)
                region, region_score = label_map[box.slices_kji()], best_score[box.slices_kji()]
                take = mask & (p > region_score)
                region[take] = label["value"]
                region_score[take] = p[take]
        else:
            box = self._region_box(probs, prepared, range(1, probs.shape[0]))
            if box is not None:
                ref = box_reference(reference, box)
                classes = self._classes_on(probs, prepared, ref, is_cancelled)
                lut = np.array([0] + values, dtype)
                best_c = lut[classes]
                del classes
                if self.postprocess:
                    postprocess_label_map(best_c, model.labels, voxel_mm3)
                label_map[box.slices_kji()] = best_c
        image = sitk.GetImageFromArray(label_map)
        image.CopyInformation(reference)
        return image, masks

