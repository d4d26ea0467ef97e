"""A model package's metadata as typed, frozen dataclasses, built once from the validated JSON.

``ModelPackage.desc`` builds a ``ModelDescription`` the first time it is asked for, from metadata that
``modelpkg.validate_metadata`` has checked against the schema. Defaults the engine applies to optional
fields (an overlap of 0.5, a threshold of 0.5, ...) are written here once, so the code that runs a
model reads ``desc.inference.overlap`` instead of ``meta["inference"].get("overlap", 0.5)``, and a typo
is found by the type checker, not by a user.

Axis orders follow the metadata: ``spacing_mm`` and ``patch_size`` are (x, y, z) = (i, j, k).
Sections only nnU-Net's code reads (``nnunet``, ``merge``) stay as the validated dictionaries and are
handed to ``nnunet.py`` as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# the defaults of optional metadata fields (schema/model.schema.json)
DEFAULT_OVERLAP = 0.5
DEFAULT_SW_BATCH_SIZE = 2
DEFAULT_BLEND_MODE = "gaussian"
DEFAULT_THRESHOLD = 0.5
DEFAULT_CROP_MARGIN_MM = 10.0


@dataclass(frozen=True)
class Postprocessing:
    """One label's clean-up rules on the output grid (``postprocess.clean_mask``)."""

    largest_component: bool = False
    min_island_mm3: float | None = None
    fill_holes: bool = False

    def __bool__(self) -> bool:
        return bool(self.largest_component or self.min_island_mm3 or self.fill_holes)

    @classmethod
    def from_meta(cls, rules: Mapping[str, Any] | None) -> Postprocessing:
        rules = rules or {}
        island = rules.get("min_island_mm3")
        return cls(bool(rules.get("largest_component", False)),
                   float(island) if island is not None else None, bool(rules.get("fill_holes", False)))


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    postprocessing: Postprocessing = field(default_factory=Postprocessing)

    @classmethod
    def from_meta(cls, label: Mapping[str, Any]) -> Label:
        r, g, b = (int(c) for c in label["color"])
        return cls(int(label["value"]), str(label["name"]), (r, g, b),
                   Postprocessing.from_meta(label.get("postprocessing")))


@dataclass(frozen=True)
class Normalization:
    """How intensities are scaled (``preprocess.normalize``)."""

    method: str  # ct_window, zscore, percentile or nnunet
    level: float | None = None  # ct_window (required there by the schema)
    width: float | None = None
    lower: float = 0.5  # percentile
    upper: float = 99.5

    @classmethod
    def from_meta(cls, spec: Mapping[str, Any]) -> Normalization:
        def number(key: str) -> float | None:
            return float(spec[key]) if spec.get(key) is not None else None

        return cls(str(spec.get("method")), number("level"), number("width"),
                   float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5)))

    @property
    def window(self) -> tuple[float, float] | None:
        """(level, width) of a CT window, else None."""
        if self.method != "ct_window" or self.level is None or self.width is None:
            return None
        return self.level, self.width


@dataclass(frozen=True)
class ForegroundCrop:
    """The box around voxels above ``threshold`` (plus a margin) that the model grid covers."""

    enabled: bool = True
    threshold: float | None = None  # None: the whole scan
    margin_mm: float = DEFAULT_CROP_MARGIN_MM

    @classmethod
    def from_meta(cls, crop: Mapping[str, Any] | None) -> ForegroundCrop:
        crop = crop or {}
        threshold = crop.get("threshold")
        return cls(bool(crop.get("enabled", True)), float(threshold) if threshold is not None else None,
                   float(crop.get("margin_mm", DEFAULT_CROP_MARGIN_MM)))

    @property
    def box_threshold(self) -> float | None:
        """The threshold of the crop box; None (the whole scan) when cropping is off."""
        return self.threshold if self.enabled else None


@dataclass(frozen=True)
class Preprocessing:
    spacing_mm: tuple[float, float, float]  # (x, y, z)
    normalization: Normalization
    foreground_crop: ForegroundCrop = field(default_factory=ForegroundCrop)

    @classmethod
    def from_meta(cls, spec: Mapping[str, Any]) -> Preprocessing:
        x, y, z = (float(s) for s in spec["spacing_mm"])
        return cls((x, y, z), Normalization.from_meta(spec["normalization"]),
                   ForegroundCrop.from_meta(spec.get("foreground_crop")))


@dataclass(frozen=True)
class Inference:
    """The model's own sliding-window settings (a run may override overlap and batch size)."""

    patch_size: tuple[int, ...]  # (x, y, z)
    overlap: float = DEFAULT_OVERLAP
    sw_batch_size: int = DEFAULT_SW_BATCH_SIZE
    blend_mode: str = DEFAULT_BLEND_MODE
    tta_flip_axes: tuple[str, ...] = ()  # of x, y, z
    tta_mirror_pairs: tuple[tuple[str, str], ...] = ()  # label names that swap when x is flipped

    @classmethod
    def from_meta(cls, spec: Mapping[str, Any]) -> Inference:
        return cls(tuple(int(p) for p in spec["patch_size"]), float(spec.get("overlap", DEFAULT_OVERLAP)),
                   int(spec.get("sw_batch_size", DEFAULT_SW_BATCH_SIZE)),
                   str(spec.get("blend_mode", DEFAULT_BLEND_MODE)),
                   tuple(str(a) for a in spec.get("tta_flip_axes", [])),
                   tuple((str(a), str(b)) for a, b in spec.get("tta_mirror_pairs", [])))


@dataclass(frozen=True)
class Network:
    framework: str  # monai or nnunetv2
    architecture: str
    spatial_dims: int
    params: Mapping[str, Any]

    @classmethod
    def from_meta(cls, spec: Mapping[str, Any]) -> Network:
        return cls(str(spec.get("framework", "monai")), str(spec["architecture"]), int(spec["spatial_dims"]),
                   dict(spec["params"]))


@dataclass(frozen=True)
class WeightsFile:
    """A file of the package and the SHA-256 it must have before it is read."""

    file: str
    sha256: str


@dataclass(frozen=True)
class ModelDescription:
    """Everything the engine needs to run a model, typed. Built by ``ModelDescription.from_meta``."""

    id: str
    version: str
    title: str
    modality: str
    inputs: tuple[str, ...]  # input channel names
    network: Network
    preprocessing: Preprocessing
    inference: Inference
    multilabel: bool  # sigmoid per label (overlapping masks) instead of one softmax argmax
    threshold: float  # multilabel: a voxel belongs to a label above this probability
    labels: tuple[Label, ...]
    weights: tuple[WeightsFile, ...]  # one per network: several for an ensemble (probabilities averaged)
    int8_files: tuple[WeightsFile, ...] = ()  # the int8 OpenVINO graph (quantize.py), if any
    # nnU-Net models: nnU-Net's plans (its own preprocessing, windows and export; nnunet.py), as validated
    nnunet: dict[str, Any] | None = field(default=None, repr=False)
    # several nnU-Net models merged (nnunet.write_merged): run member by member
    merged: bool = False

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModelDescription:
        """From metadata that passed ``modelpkg.validate_metadata`` (KeyError on anything else)."""
        weights = meta["weights"]
        output = meta["output"]
        return cls(
            id=str(meta["id"]), version=str(meta["version"]), title=str(meta["title"]),
            modality=str(meta["modality"]), inputs=tuple(str(i["name"]) for i in meta["inputs"]),
            network=Network.from_meta(meta["network"]),
            preprocessing=Preprocessing.from_meta(meta["preprocessing"]),
            inference=Inference.from_meta(meta["inference"]),
            multilabel=output["type"] == "multilabel",
            threshold=float(output.get("threshold", DEFAULT_THRESHOLD)),
            labels=tuple(Label.from_meta(label) for label in meta["labels"]),
            weights=_weights(weights if isinstance(weights, list) else [weights]),
            int8_files=_weights(meta.get("int8", {}).get("files", [])),
            nnunet=meta.get("nnunet"), merged="merge" in meta)

    # ---- derived ------------------------------------------------------------------------------
    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def label_values(self) -> list[int]:
        return [label.value for label in self.labels]

    @property
    def out_channels(self) -> int:
        """Network output channels: one per label, plus background for a multi-class model."""
        return len(self.labels) + (0 if self.multilabel else 1)

    @property
    def window_zyx(self) -> tuple[int, ...]:
        """The network's window in array order (z, y, x): nnU-Net's patch, else the patch reversed."""
        if self.nnunet is not None:
            return tuple(int(p) for p in self.nnunet["patch_size"])
        return tuple(reversed(self.inference.patch_size))

    @property
    def weights_key(self) -> str:
        """Identifies the weights (all members' SHA-256): equal keys mean the same network."""
        return "+".join(w.sha256 for w in self.weights)


def _weights(entries: Sequence[Mapping[str, Any]]) -> tuple[WeightsFile, ...]:
    return tuple(WeightsFile(str(w["file"]), str(w["sha256"])) for w in entries)
