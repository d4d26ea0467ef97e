"""Sliding-window U-Net inference, from input volumes to labels on exactly the input's grid.

``Predictor`` follows nnU-Net's three phases: construct it with runtime knobs (device, overlap, ...),
``load`` a model package once (it stays warm for later calls), then ``predict`` any number of scans.
It composes three steps, each its own unit:

1. ``preprocess.prepare``: the scan resampled once onto the model grid, normalised;
2. ``windows.NetworkRunner``: the networks over that grid (sliding windows, TTA, ensemble mean, the
   runtime seam, cancel and progress, the GPU out-of-memory fallback);
3. ``inputgrid.labels_on_input_grid``: probabilities back onto the input's grid (boundary-only
   interpolation), labels as uint8.

Per-run settings (overlap, window batch, TTA, mirroring, clean-up, uncertainty) are a validated
``RunSettings``; ``with_settings`` gives a predictor with other settings that shares the loaded
networks, so a warm predictor serves requests with different settings without reloading.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from .checks import check_settings, check_volume, modality_warnings
from .errors import CancelledError, UNetSegError
from .inputgrid import Masks, labels_on_input_grid, region_box
from .modelpkg import ModelPackage, get_model
from .preprocess import Prepared, prepare
from .runtimes import release_freed_heap
from .windows import (
    CancelCallback,
    NetworkRunner,
    ProgressCallback,
    WindowSettings,
    never_cancelled,
    no_progress,
    resolve_device,
)

__all__ = ["CancelCallback", "Predictor", "ProgressCallback", "RunSettings", "SegmentationResult"]


@dataclass
class SegmentationResult:
    """Labels on the first input's grid.

    ``label_map``: one label per voxel (uint8, or uint16 past 255 labels). For multi-label models,
    ``masks`` holds each label's own (possibly overlapping) mask as ``(box, bool array (k, j, i))``,
    and ``label_map`` resolves overlaps to the most probable label.
    """

    label_map: sitk.Image
    model: ModelPackage
    masks: Masks | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    messages: list[str] = field(default_factory=list)
    runtime: str = "torch"  # which ran the network: torch, openvino or onnxruntime
    # per label: volume, confidence, flags, where to look first (``review.build_review``)
    review: list[dict] | None = None
    # uint8 uncertainty on the first input's grid, when asked for (``Predictor(uncertainty=True)``)
    uncertainty: sitk.Image | None = None


@dataclass(frozen=True)
class RunSettings(WindowSettings):
    """Everything a run may change on a loaded predictor, checked when built."""

    postprocess: bool = True  # the labels' clean-up rules (largest component, islands, holes)
    uncertainty: bool = False  # also bring back the uncertainty map (review.uncertainty_map)

    @property
    def windows(self) -> WindowSettings:
        """The part the network runner reads."""
        return WindowSettings(**{f.name: getattr(self, f.name) for f in fields(WindowSettings)})


def _setting(name: str) -> Any:
    def get(self: Predictor) -> Any:
        return getattr(self.settings, name)

    def set_checked(self: Predictor, value: Any) -> None:
        self._use_settings(replace(self.settings, **{name: value}))

    return property(get, set_checked, doc=f"``RunSettings.{name}`` of this predictor.")


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
        self.settings = RunSettings(overlap=overlap, sw_batch_size=sw_batch_size, tta=tta, mirror=mirror,
                                    postprocess=postprocess, uncertainty=uncertainty)
        self.device = resolve_device(device)
        self.runtime_request = check_runtime(runtime)  # auto, torch, openvino, onnxruntime, ...
        self.model: ModelPackage | None = None
        self.network: NetworkRunner | None = None  # None until loaded, and for merged packages
        # merged nnU-Net packages: one predictor per member and its label values (nnunet.predict_merged)
        self.members: list[tuple[Predictor, dict[str, int]]] = []

    # ---- settings -----------------------------------------------------------------------------
    def with_settings(self, **changes: Any) -> Predictor:
        """A predictor with these ``RunSettings`` changed (checked), sharing the loaded networks.

        What a warm worker does per request: ``base.load(package)`` once, then
        ``base.with_settings(overlap=..., tta=...).predict(...)``; ``base`` stays as it was.
        """
        other = copy.copy(self)
        other._use_settings(replace(self.settings, **changes))
        return other

    def _use_settings(self, settings: RunSettings) -> None:
        self.settings = settings
        if self.network is not None:
            self.network = self.network.with_settings(settings.windows)
        member = _member_changes(_as_changes(settings))
        self.members = [(sub.with_settings(**member), values) for sub, values in self.members]

    # Read the run's settings as attributes. Assigning one (``predictor.overlap = 0.7``, what the
    # worker did before ``with_settings``) is checked as ``with_settings`` checks it.
    overlap = _setting("overlap")
    sw_batch_size = _setting("sw_batch_size")
    tta = _setting("tta")
    mirror = _setting("mirror")
    postprocess = _setting("postprocess")
    uncertainty = _setting("uncertainty")

    # what the loaded network part runs on (benchmarks and the command line report these)
    @property
    def runtime(self) -> str:
        return self.network.runtime if self.network is not None else "torch"

    @property
    def runtime_notes(self) -> list[str]:
        return self.network.runtime_notes if self.network is not None else []

    @property
    def networks(self) -> list[Any]:
        return self.network.networks if self.network is not None else []

    @property
    def window_runners(self) -> list[Any]:
        return self.network.window_runners if self.network is not None else []

    # ---- phase 2: load ------------------------------------------------------------------------
    def load(self, model: ModelPackage | str | None = None) -> ModelPackage:
        """Build the network(s) and load checked weights; a no-op if this model is already loaded."""
        package = model if isinstance(model, ModelPackage) else get_model(model)
        if self.model is not None and self.has_loaded(package):
            return self.model
        self.members = []
        self.network = None
        if package.desc.merged:  # several nnU-Net models merged: one predictor each
            from .nnunet import member_packages

            for member, values in member_packages(package):
                sub = Predictor(device=self.device, runtime=self.runtime_request,
                                **_member_changes(_as_changes(self.settings)))
                sub.load(member)
                self.members.append((sub, values))
        else:
            self.network = NetworkRunner(package, self.device, self.runtime_request, self.settings.windows)
        self.model = package
        # Loading freed the checkpoint, the networks' copies made for export and, on a compiled
        # runtime, the PyTorch networks (torch modules hold reference cycles): give that back to the
        # system. nnU-Net's default network for OpenKBP on OpenVINO: resident 1012 -> 723 MB.
        gc.collect()
        release_freed_heap()
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
        desc = model.desc
        if desc.merged:
            from .nnunet import predict_merged

            return predict_merged(self, images, progress, cancel)
        if len(images) != desc.n_inputs:
            raise UNetSegError(f"Model '{desc.id}' takes {desc.n_inputs} input volume(s) "
                               f"({', '.join(desc.inputs)}); {len(images)} were given.")
        for i, image in enumerate(images):
            check_volume(image, f"input volume {i + 1}")
        check_settings(window=window)
        network = self.network
        assert network is not None
        report = progress or no_progress
        is_cancelled = cancel or never_cancelled
        timings: dict[str, float] = {}
        messages = modality_warnings(images, desc.modality) + list(network.runtime_notes)

        t = time.perf_counter()
        report("preprocessing", 0.0)
        if desc.nnunet is not None:  # nnU-Net's own preprocessing (nnunet.py)
            from . import nnunet

            prepared = nnunet.prepare(images, desc.nnunet)
        else:
            prepared = prepare(images, desc.preprocessing, window)
        timings["preprocess_s"] = time.perf_counter() - t
        release_freed_heap()  # preprocessing's whole-scan temporaries, before the windows' buffers
        if is_cancelled():
            raise CancelledError()

        t = time.perf_counter()
        probs, ran_on = network.probabilities(prepared.array, report, is_cancelled, messages)
        timings["inference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        report("resampling to the input grid", 0.0)
        label_map, masks = self._to_input_grid(probs, prepared, is_cancelled)
        timings["resample_s"] = time.perf_counter() - t

        t = time.perf_counter()
        review_entries, uncertainty = self._review(probs, prepared, label_map, masks)
        timings["review_s"] = time.perf_counter() - t
        report("done", 1.0)
        return SegmentationResult(label_map, model, masks, timings, ran_on, messages, network.runtime,
                                  review_entries, uncertainty)

    def _to_input_grid(self, probs: np.ndarray, prepared: Prepared,
                       is_cancelled: CancelCallback) -> tuple[sitk.Image, Masks | None]:
        # a method, so that nnunet.predict_merged can see each member's model-grid output
        assert self.model is not None
        return labels_on_input_grid(probs, prepared, self.model.desc, postprocess=self.settings.postprocess,
                                    is_cancelled=is_cancelled)

    def _review(self, probs: np.ndarray, prepared: Prepared, label_map: sitk.Image,
                masks: Masks | None) -> tuple[list[dict], sitk.Image | None]:
        """Confidence, flags and (when asked for) the uncertainty map: ``review.py``."""
        from .review import build_review, uncertainty_map

        model = self.model
        assert model is not None
        logits = model.desc.nnunet is not None
        if logits:  # nnU-Net's windows give logits; the review reads probabilities
            import torch

            probs = torch.softmax(torch.from_numpy(np.asarray(probs, np.float32)), 0).numpy()
        entries = build_review(probs, prepared, model, label_map, masks)
        if not self.settings.uncertainty:
            return entries, None
        channels = range(probs.shape[0]) if model.desc.multilabel else range(1, probs.shape[0])
        return entries, uncertainty_map(probs, prepared, model, region_box(probs, prepared, channels, logits))


def _as_changes(settings: RunSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def _member_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """The settings a merged package's member predictors take: not TTA (nnU-Net models mirror
    instead) nor uncertainty (the merge brings back labels only)."""
    return {k: v for k, v in changes.items() if k not in ("tta", "uncertainty")}
