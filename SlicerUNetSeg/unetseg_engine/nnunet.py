"""nnU-Net v2 trained-model folders as model packages, run by our engine with nnU-Net's own numbers.

``import_nnunet`` turns ``<Trainer>__<Plans>__<configuration>/`` (``dataset.json``, ``plans.json``,
``fold_*/checkpoint_final.pth``) into a normal model package: ``metadata.json`` with a top-level
``nnunet`` section (everything nnU-Net's preprocessing and sliding windows need, copied from the plans)
and one plain state dict per fold. Nothing from the folder is run:

- the network is built from the plans' ``architecture`` entry through allow-lists: the two
  ``dynamic_network_architectures`` classes nnU-Net ships (PlainConvUNet, ResidualEncoderUNet), and
  for the classes it names (convolution, normalisation, dropout, non-linearity) a table of torch
  classes; no dotted path is ever imported;
- checkpoints load with ``torch.load(weights_only=True)``, allowing only the numpy scalar types
  nnU-Net's training log holds; anything else is refused with a clear message.

At run time (``Predictor`` calls ``prepare`` and ``run_windows`` for packages with an ``nnunet``
section) the scan goes through nnU-Net's steps, reimplemented with numpy/scipy (nnunetv2 itself is a
test and benchmark dependency only): array axes as SimpleITK gives them, ``transpose_forward``, crop
to the non-zero box, per-channel normalisation (CT: clip to the fingerprint's 0.5/99.5 percentiles,
z-score with its foreground mean and std; z-score otherwise), resampling to the plans' spacing
(``skimage.transform.resize``'s arithmetic: ``scipy.ndimage.zoom`` in grid mode, edge mode, clipped;
order 3, and order 0 along the low-resolution axis of anisotropic scans), sliding windows at step 0.5
with nnU-Net's Gaussian weighting and mirroring over the checkpoint's allowed axes, logits averaged
over mirrors and folds. Back on the input grid, nnU-Net interpolates the logits linearly and takes the
argmax; the engine's boundary-only interpolation computes the same argmax (``_argmax_on``), given a
model grid whose geometry matches nnU-Net's resize convention (``_grid_geometry``).

Everything at the top of this module imports without torch (listing models must not import it).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .boxes import Box
from .errors import UNetSegError

# nnU-Net's network classes we can build, by the dotted names plans use -> our short name.
ARCHITECTURE_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}
# torch classes the plans may name for the network's building blocks (by every spelling nnU-Net
# writes) -> our short name. Anything else is refused.
_TORCH_CLASSES = {
    "conv_op": ["Conv2d", "Conv3d"],
    "norm_op": ["InstanceNorm2d", "InstanceNorm3d", "BatchNorm2d", "BatchNorm3d", "GroupNorm"],
    "dropout_op": ["Dropout", "Dropout2d", "Dropout3d"],
    "nonlin": ["LeakyReLU", "ReLU", "PReLU", "GELU", "ELU"],
}
_TORCH_MODULES = {"conv_op": "conv", "norm_op": ("instancenorm", "batchnorm", "normalization"),
                  "dropout_op": "dropout", "nonlin": "activation"}
# Keyword arguments each architecture takes from the plans (channel counts are added by us).
_COMMON_KWARGS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides",
                  "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                  "dropout_op_kwargs", "nonlin", "nonlin_kwargs"}
ARCHITECTURE_KWARGS = {
    "PlainConvUNet": _COMMON_KWARGS | {"n_conv_per_stage", "nonlin_first"},
    "ResidualEncoderUNet": _COMMON_KWARGS | {"n_blocks_per_stage", "bottleneck_channels",
                                             "stem_channels"},
}
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                  "RescaleTo01Normalization")
ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
CHECKPOINT_NAME = "checkpoint_final.pth"

# Common anatomical names (lower case, without separators) -> SNOMED CT code and meaning; the
# category is "Anatomical Structure". Unmapped names still become segments, without terminology.
_ANATOMY = {
    "brainstem": ("15926001", "Brainstem"), "spinalcord": ("2748008", "Spinal cord"),
    "parotid": ("45289007", "Parotid gland"), "esophagus": ("32849002", "Esophagus"),
    "larynx": ("4596009", "Larynx"), "mandible": ("91609006", "Mandible"),
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"),
    "kidney": ("64033007", "Kidney"), "pancreas": ("15776009", "Pancreas"),
    "stomach": ("69695003", "Stomach"), "gallbladder": ("28231008", "Gallbladder"),
    "lung": ("39607008", "Lung"), "heart": ("80891009", "Heart"), "aorta": ("15825003", "Aorta"),
    "brain": ("12738006", "Brain"), "bladder": ("89837001", "Urinary bladder"),
    "urinarybladder": ("89837001", "Urinary bladder"), "prostate": ("41216001", "Prostate"),
    "rectum": ("34402009", "Rectum"), "colon": ("71854001", "Colon"),
    "duodenum": ("38848004", "Duodenum"), "smallbowel": ("30315005", "Small intestine"),
    "trachea": ("44567001", "Trachea"), "thyroid": ("69748006", "Thyroid gland"),
    "thyroidgland": ("69748006", "Thyroid gland"), "adrenalgland": ("23451007", "Adrenal gland"),
    "femur": ("71341001", "Femur"), "sacrum": ("54735007", "Sacrum"),
    "opticnerve": ("18234004", "Optic nerve"), "eye": ("81745001", "Eye"),
    "chiasm": ("53549008", "Optic chiasm"), "opticchiasm": ("53549008", "Optic chiasm"),
    "cochlea": ("80169004", "Cochlea"), "submandibular": ("54019009", "Submandibular gland"),
    "inferiorvenacava": ("64131007", "Inferior vena cava"), "portalvein": ("32764006", "Portal vein"),
}
_SIDES = {"left": ("7771000", "Left"), "right": ("24028007", "Right")}
# A colour per label, cycling (Slicer's generic anatomy colours are not known for arbitrary names).
_COLOURS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
            (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
            (255, 250, 220), (230, 220, 70), (200, 200, 235), (250, 250, 210), (244, 214, 49),
            (0, 151, 206), (216, 101, 79), (183, 156, 220), (183, 214, 211), (152, 189, 207)]


# ---- metadata from an nnU-Net folder ---------------------------------------------------------------
def terminology_for(name: str) -> dict[str, Any] | None:
    """A DICOM terminology entry for a common anatomical label name (e.g. 'kidney_left'), or None."""
    key = re.sub(r"[^a-z]", "", name.lower())
    side = None
    for word in _SIDES:
        if key.startswith(word) or key.endswith(word):
            side = word
            key = key[len(word):] if key.startswith(word) else key[:-len(word)]
            break
    key = key[:-1] if key.endswith("s") and key[:-1] in _ANATOMY else key
    if key.endswith("gland") and key not in _ANATOMY and key[:-5] in _ANATOMY:
        key = key[:-5]
    if key not in _ANATOMY:
        return None
    code, meaning = _ANATOMY[key]
    entry: dict[str, Any] = {
        "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
        "type": {"scheme": "SCT", "code": code, "meaning": meaning}}
    if side:
        entry["type_modifier"] = {"scheme": "SCT", "code": _SIDES[side][0], "meaning": _SIDES[side][1]}
    return entry


def _read_json(path: Path, what: str) -> Any:
    from .packagecheck import read_metadata  # size and nesting limits

    if not path.is_file():
        raise UNetSegError(f"'{path.parent}' is not an nnU-Net trained-model folder: it has no {what} "
                           f"({path.name}). Give the folder named <Trainer>__<Plans>__<configuration>.")
    return read_metadata(path)


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration of the plans with ``inherits_from`` resolved (as nnU-Net's PlansManager)."""
    configs = plans.get("configurations") or {}
    seen: list[str] = []
    chain = []
    while True:
        if name not in configs:
            raise UNetSegError(f"plans.json has no configuration '{name}' (it has: "
                               f"{', '.join(configs) or 'none'}).")
        if name in seen:
            raise UNetSegError(f"plans.json: configurations inherit from each other in a circle ({seen}).")
        seen.append(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
        if name is None:
            break
    merged: dict[str, Any] = {}
    for config in reversed(chain):
        merged.update({k: v for k, v in config.items() if k != "inherits_from"})
    return merged


def _old_plans_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The ``architecture`` entry for plans written before nnU-Net 2.4 (as nnU-Net converts them)."""
    name = config.get("UNet_class_name")
    if name not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise UNetSegError(f"plans.json: unknown network architecture class '{name}'. Supported: "
                           "PlainConvUNet, ResidualEncoderUNet.")
    dim = len(config["patch_size"])
    n_stages = len(config["n_conv_per_stage_encoder"])
    blocks = "n_conv_per_stage" if name == "PlainConvUNet" else "n_blocks_per_stage"
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": [min(config["UNet_base_num_features"] * 2 ** i,
                                           config["unet_max_num_features"]) for i in range(n_stages)],
                "conv_op": f"Conv{dim}d", "kernel_sizes": config["conv_kernel_sizes"],
                "strides": config["pool_op_kernel_sizes"], blocks: config["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
                "norm_op": f"InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "LeakyReLU",
                "nonlin_kwargs": {"inplace": True}}}


def _torch_class_name(key: str, value: Any) -> str | None:
    """The short torch class name for one of the plans' class strings, or a clear refusal."""
    if value is None:
        if key in ("conv_op",):
            raise UNetSegError("plans.json: the network's conv_op is missing.")
        return None
    if not isinstance(value, str):
        raise UNetSegError(f"plans.json: the network's {key} must be a class name, not {value!r}.")
    parts = value.split(".")
    short = parts[-1]
    modules = _TORCH_MODULES[key]
    modules = (modules,) if isinstance(modules, str) else modules
    spellings = len(parts) == 1 or value == f"torch.nn.{short}" or any(
        value == f"torch.nn.modules.{m}.{short}" for m in modules)
    if short not in _TORCH_CLASSES[key] or not spellings:
        raise UNetSegError(f"plans.json names '{value}' as the network's {key}; only these torch "
                           f"classes are accepted: {', '.join(_TORCH_CLASSES[key])}. Nothing was "
                           "imported.")
    return short


def network_description(config: dict[str, Any]) -> dict[str, Any]:
    """Our ``network`` entry (framework nnunetv2) from a plans configuration, through the allow-lists."""
    arch = config.get("architecture") or _old_plans_architecture(config)
    cls = arch.get("network_class_name")
    if cls not in ARCHITECTURE_CLASSES:
        raise UNetSegError(f"plans.json: unknown network architecture class '{cls}'. Supported: "
                           "dynamic_network_architectures' PlainConvUNet and ResidualEncoderUNet. A "
                           "custom architecture would have to run code from the folder, which the "
                           "engine never does.")
    name = ARCHITECTURE_CLASSES[cls]
    kwargs = dict(arch.get("arch_kwargs") or {})
    if "block" in kwargs and kwargs.pop("block") not in (
            None, "BasicBlockD", "dynamic_network_architectures.building_blocks.residual.BasicBlockD"):
        raise UNetSegError("plans.json: only BasicBlockD residual blocks are supported.")
    params: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in ARCHITECTURE_KWARGS[name]:
            raise UNetSegError(f"plans.json: the {name} parameter '{key}' is not supported "
                               f"(accepted: {', '.join(sorted(ARCHITECTURE_KWARGS[name]))}).")
        params[key] = _torch_class_name(key, value) if key in _TORCH_CLASSES else value
    spatial_dims = len(config["patch_size"])
    return {"framework": "nnunetv2", "architecture": name, "spatial_dims": spatial_dims,
            "params": params}


def validate_network(architecture: str, spatial_dims: int, params: dict[str, Any]) -> None:
    """Raise UNetSegError unless an nnU-Net network description is on the allow-lists."""
    if architecture not in ARCHITECTURE_KWARGS:
        raise UNetSegError(f"Unknown nnU-Net architecture '{architecture}'.")
    for key, value in params.items():
        if key not in ARCHITECTURE_KWARGS[architecture]:
            raise UNetSegError(f"Parameter '{key}' is not accepted for {architecture}.")
        if key in _TORCH_CLASSES and value is not None and value not in _TORCH_CLASSES[key]:
            raise UNetSegError(f"'{value}' is not an accepted {key} for {architecture}.")
    if params.get("conv_op") not in (f"Conv{spatial_dims}d",):
        raise UNetSegError(f"An nnU-Net network with spatial_dims {spatial_dims} needs conv_op "
                           f"Conv{spatial_dims}d.")


def check_patch_fits(params: dict[str, Any], patch: list[int]) -> None:
    """Raise UNetSegError unless the plans' patch (network axis order) is a multiple of the strides."""
    factor = np.ones(len(patch), int)
    for stride in params.get("strides", []):
        factor *= np.broadcast_to(np.asarray(stride, int), factor.shape)
    if any(int(p) % int(f) for p, f in zip(patch, factor)):
        raise UNetSegError(f"The nnU-Net patch size {patch} is not a multiple of the network's "
                           f"downsampling {factor.tolist()}.")


def build_network(description: dict[str, Any], in_channels: int, out_channels: int):
    """The nnU-Net network, from the allow-listed description (imports torch)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    params = dict(description["params"])
    validate_network(description["architecture"], description["spatial_dims"], params)
    for key in _TORCH_CLASSES:
        if params.get(key) is not None:
            params[key] = getattr(torch.nn, params[key])
    cls = {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}[
        description["architecture"]]
    return cls(input_channels=in_channels, num_classes=out_channels, deep_supervision=False, **params)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint's network weights and inference fields, loaded without running code."""
    import torch

    allowed: list[Any] = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
                          type(np.dtype(np.int64))]
    try:  # numpy 2 moved the scalar reconstructor
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed.append(scalar)
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling a stranger's bytes can raise anything
        detail = str(error).splitlines()[0][:200] if "Unsupported global" in str(error) else \
            type(error).__name__
        if "Unsupported global" in str(error):
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            detail = f"it holds an object of type {found.group(1)}" if found else detail
        raise UNetSegError(f"The nnU-Net checkpoint '{path}' could not be loaded as plain data "
                           f"({detail}): a checkpoint may hold tensors, numbers, strings and lists; "
                           "anything else could run code, so nothing in it was run. Use a checkpoint "
                           "written by nnU-Net's own trainer.") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise UNetSegError(f"'{path}' is not an nnU-Net checkpoint (no 'network_weights').")
    state = {}
    for key, value in checkpoint["network_weights"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UNetSegError(f"'{path}': its network weights are not a mapping of names to tensors.")
        for prefix in ("_orig_mod.", "module."):  # torch.compile and DDP wrappers
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return {"state": state, "mirror_axes": None if axes is None else [int(a) for a in axes],
            "trainer_name": checkpoint.get("trainer_name")}


def _labels(dataset: dict[str, Any]) -> list[dict[str, Any]]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UNetSegError("dataset.json has no 'labels'.")
    if "regions_class_order" in dataset or any(not isinstance(v, int) for v in labels.values()):
        raise UNetSegError("dataset.json describes a region-based nnU-Net model (labels with several "
                           "values); only plain label maps are supported.")
    by_value = sorted((v, k) for k, v in labels.items() if k != "ignore")
    if [v for v, _ in by_value] != list(range(len(by_value))) or by_value[0][1] != "background":
        raise UNetSegError("dataset.json: labels must be 0 'background', then 1, 2, ... in order.")
    out = []
    for value, name in by_value[1:]:
        label: dict[str, Any] = {"value": value, "name": name,
                                 "color": list(_COLOURS[(value - 1) % len(_COLOURS)])}
        term = terminology_for(name)
        if term:
            label["terminology"] = term
        out.append(label)
    return out


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-._")
    return (slug or "nnunet-model")[:64]


def describe_folder(folder: Path, folds: list[int] | None = None) -> dict[str, Any]:
    """Everything an import needs from an nnU-Net folder, checked; loads each chosen checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UNetSegError(f"'{folder}' is not a folder.")
    dataset = _read_json(folder / "dataset.json", "dataset description")
    plans = _read_json(folder / "plans.json", "plans")
    parts = folder.name.split("__")
    configs = list((plans.get("configurations") or {}).keys())
    configuration = parts[2] if len(parts) == 3 else (configs[0] if len(configs) == 1 else None)
    if configuration is None:
        raise UNetSegError(f"The folder name '{folder.name}' is not <Trainer>__<Plans>__<configuration>, "
                           "so the configuration to use is unknown.")
    config = resolve_configuration(plans, configuration)
    network = network_description(config)
    available = sorted(int(p.name[5:]) for p in folder.glob("fold_*")
                       if p.name[5:].isdigit() and (p / CHECKPOINT_NAME).is_file())
    if not available:
        raise UNetSegError(f"'{folder}' has no fold_*/{CHECKPOINT_NAME}: the model was not trained to "
                           "the end (or the checkpoints were not copied).")
    chosen = available if folds is None else folds
    missing = [f for f in chosen if f not in available]
    if missing:
        raise UNetSegError(f"Fold(s) {missing} have no {CHECKPOINT_NAME} in '{folder}'; available: "
                           f"{available}.")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise UNetSegError("dataset.json has no 'channel_names'.")
    channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
    schemes = list(config.get("normalization_schemes", []))
    if len(schemes) != len(channel_names) or any(s not in NORMALIZATIONS for s in schemes):
        raise UNetSegError(f"plans.json: normalisation {schemes} is not supported for channels "
                           f"{channel_names} (supported: {', '.join(NORMALIZATIONS)}).")
    checkpoints = []
    for fold in chosen:
        path = folder / f"fold_{fold}" / CHECKPOINT_NAME
        checkpoints.append(dict(load_checkpoint(path), fold=fold, path=path))
    return {"dataset": dataset, "plans": plans, "configuration": configuration, "config": config,
            "network": network, "channels": channel_names, "checkpoints": checkpoints,
            "trainer": parts[0] if len(parts) == 3 else None,
            "plans_name": plans.get("plans_name")}


def _nnunet_section(d: dict[str, Any]) -> dict[str, Any]:
    config, plans = d["config"], d["plans"]
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    intensity = []
    for i, scheme in enumerate(config["normalization_schemes"]):
        p = props.get(str(i)) or props.get(i)
        if scheme == "CTNormalization" and not p:
            raise UNetSegError(f"plans.json: channel {i} uses CTNormalization but the plans hold no "
                               "intensity properties for it.")
        intensity.append({k: float(p[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")}
                         if p else None)
    mirror = d["checkpoints"][0]["mirror_axes"]
    dims = len(config["patch_size"])
    data_kw = config.get("resampling_fn_data_kwargs") or {"order": 3, "order_z": 0,
                                                          "force_separate_z": None}
    prob_kw = config.get("resampling_fn_probabilities_kwargs") or {"order": 1, "order_z": 0,
                                                                   "force_separate_z": None}
    for name in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(name, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
            raise UNetSegError(f"plans.json: the resampling function '{config[name]}' is not "
                               "supported (only nnU-Net's default).")
    return {
        "configuration": d["configuration"], "trainer": d["trainer"], "plans_name": d["plans_name"],
        "transpose_forward": [int(a) for a in plans.get("transpose_forward", range(3))],
        "transpose_backward": [int(a) for a in plans.get("transpose_backward", range(3))],
        "spacing": [float(s) for s in config["spacing"]],
        "patch_size": [int(p) for p in config["patch_size"]],
        "normalization_schemes": list(config["normalization_schemes"]),
        "use_mask_for_norm": [bool(b) for b in config.get("use_mask_for_norm", [False] * dims)],
        "intensity_properties": intensity,
        "resampling_data": {k: data_kw.get(k) for k in ("order", "order_z", "force_separate_z")},
        "resampling_probabilities": {k: prob_kw.get(k) for k in ("order", "order_z",
                                                                 "force_separate_z")},
        # None (nnU-Net's trainers without mirroring, e.g. nnUNetTrainerNoMirroring): nnUNetPredictor
        # does not mirror at all, so neither do we
        "mirror_axes": [] if mirror is None else mirror,
        "step_size": 0.5,
    }


def _spacing_xyz(section: dict[str, Any]) -> list[float]:
    """The plans' spacing (network axis order) as (x, y, z) of the scan."""
    untransposed = [section["spacing"][i] for i in section["transpose_backward"]]  # (z, y, x)
    return [float(s) for s in untransposed[::-1]]


def import_nnunet(folder: str | os.PathLike, licence: str, folds: list[int] | None = None,
                  model_id: str | None = None, destination: Path | None = None,
                  overwrite: bool = False):
    """Turn an nnU-Net v2 trained-model folder into an installed model package (atomic)."""
    import torch

    from .modelpkg import (
        METADATA_FILE,
        load_package,
        replace_with_staged,
        sha256_of,
        shipped_model_ids,
        user_models_dir,
        validate_metadata,
    )
    from .packagecheck import check_package_runs

    folder = Path(folder)
    if not licence or len(licence.strip()) < 2:
        raise UNetSegError("nnU-Net folders carry no licence: give the model's licence with --licence "
                           "(for example 'CC-BY-4.0', 'Apache-2.0', or 'research use only').")
    d = describe_folder(folder, folds)
    dataset = d["dataset"]
    model_id = model_id or _slug(f"nnunet-{dataset.get('name') or folder.parent.name}-"
                                 f"{d['configuration']}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{1,63}", model_id):
        raise UNetSegError(f"'{model_id}' is not a valid model id (lower-case letters, digits, '_', "
                           "'.', '-'; 2-64 characters).")
    if model_id in shipped_model_ids():
        raise UNetSegError(f"'{model_id}' is the id of a shipped model; choose another with --model-id.")
    section = _nnunet_section(d)
    patch = section["patch_size"]
    patch_untransposed = [patch[i] for i in section["transpose_backward"]]
    schemes = section["normalization_schemes"]
    modality = "CT" if schemes[0] == "CTNormalization" else (
        "MR" if any(w in d["channels"][0].upper() for w in ("T1", "T2", "MR", "FLAIR", "ADC", "DWI"))
        else "other")
    destination = destination or user_models_dir()
    target = destination / model_id
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise UNetSegError(f"A model '{model_id}' is already installed at '{target}'. Use --overwrite "
                           "to replace it.")
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=destination))
    try:
        weights, sources = [], []
        for ck in d["checkpoints"]:
            name = f"fold_{ck['fold']}.pt"
            torch.save({k: v.detach().cpu().contiguous() for k, v in ck["state"].items()},
                       staging / name)
            weights.append({"file": name, "sha256": sha256_of(staging / name)})
            sources.append({"fold": ck["fold"], "file": str(ck["path"].relative_to(folder)),
                            "sha256": sha256_of(ck["path"])})
        section["source"] = {"folder": folder.name, "checkpoints": sources,
                             "dataset_json_sha256": hashlib.sha256(
                                 (folder / "dataset.json").read_bytes()).hexdigest(),
                             "plans_json_sha256": hashlib.sha256(
                                 (folder / "plans.json").read_bytes()).hexdigest()}
        title = f"{dataset.get('name') or folder.parent.name} (nnU-Net {d['configuration']})"
        meta = {
            "schema_version": 1, "id": model_id, "version": "1.0.0", "title": title,
            "description": (f"nnU-Net v2 model imported from '{folder.name}' ({len(weights)} fold(s): "
                            f"{', '.join(str(c['fold']) for c in d['checkpoints'])}); run with "
                            "nnU-Net's preprocessing, sliding windows and mirroring."),
            "licence": licence.strip(), "modality": modality,
            "inputs": [{"name": n} for n in d["channels"]],
            "network": d["network"],
            "preprocessing": {"spacing_mm": _spacing_xyz(section),
                              "normalization": {"method": "nnunet"}},
            "inference": {"patch_size": [int(p) for p in patch_untransposed[::-1]],
                          "overlap": 0.5, "sw_batch_size": 1},
            "output": {"type": "multiclass"},
            "labels": _labels(dataset),
            "weights": weights if len(weights) > 1 else weights[0],
            "nnunet": section,
        }
        validate_metadata(meta, f"metadata generated from {folder}")
        staging.chmod(0o755)
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        check_package_runs(load_package(staging))
        replace_with_staged(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_package(target)


def ask_licence(folder: Path) -> str:
    """The licence, asked on the terminal (only when stdin is one); else a clear refusal."""
    if not sys.stdin.isatty():
        raise UNetSegError(f"'{folder}' carries no licence, and nnU-Net folders never do: give it with "
                           "--licence (for example --licence 'CC-BY-4.0' or --licence 'research use "
                           "only'), as the model's authors state it.")
    answer = input(f"Licence of the model in '{folder.name}' (as its authors state it): ").strip()
    if len(answer) < 2:
        raise UNetSegError("No licence given; nothing was imported.")
    return answer


# ---- preprocessing, exactly as nnU-Net ------------------------------------------------------------
def _resize(image: np.ndarray, shape, order: int, dtype=np.float64) -> np.ndarray:
    """``skimage.transform.resize(image, shape, order, mode='edge', anti_aliasing=False)``, the result
    as ``dtype``. skimage converts the image to float64 first; we don't need to: SciPy computes the
    spline coefficients and the interpolation in float64 whatever the input's type, so a float32
    image gives the same numbers without a float64 copy of the whole scan (630 MB on 512x512x300)."""
    from scipy import ndimage

    if tuple(image.shape) == tuple(shape):
        return np.asarray(image, dtype)
    if order <= 1:  # no spline coefficients; interpolation of order <= 1 cannot overshoot
        zoom = [o / i for i, o in zip(image.shape, shape)]
        return ndimage.zoom(image, zoom, output=dtype, order=order, mode="nearest", grid_mode=True)
    low, high = image.min(), image.max()
    out = _zoom_cubic_by_axis(image, shape, dtype) if order == 3 else _zoom_spline(image, shape, order, dtype)
    np.clip(out, low, high, out=out)  # skimage clips to the input's range
    return out


SPLINE_PAD = 12  # what ``ndimage.zoom`` pads by before its spline filter (``_prepad_for_spline_filter``)


def _zoom_spline(image: np.ndarray, shape, order: int, dtype) -> np.ndarray:
    """``ndimage.zoom(image, ..., order, mode="nearest", grid_mode=True)`` with one whole-scan copy
    instead of two: zoom pads the image by edge replication (a copy in its own type) and then
    spline-filters that into a float64 copy. Here the padded image is written as float64 once, filtered
    in place, and interpolated without a second prefilter (on 512x512x300: 340 MB less)."""
    from scipy import ndimage

    pad = SPLINE_PAD
    padded = np.empty([n + 2 * pad for n in image.shape], np.float64)
    padded[tuple(slice(pad, pad + n) for n in image.shape)] = image
    for axis, n in enumerate(image.shape):  # edge replication, axis by axis as np.pad does
        before: list[slice | int] = [slice(None)] * image.ndim
        after = list(before)
        before[axis], after[axis] = slice(0, pad), slice(pad + n, None)
        first, last = list(before), list(before)
        first[axis], last[axis] = slice(pad, pad + 1), slice(pad + n - 1, pad + n)
        padded[tuple(before)] = padded[tuple(first)]
        padded[tuple(after)] = padded[tuple(last)]
    ndimage.spline_filter(padded, order, output=padded, mode="nearest")
    factor = [i / o for i, o in zip(image.shape, shape)]
    # grid mode: output voxel o samples input coordinate (o + 0.5) * factor - 0.5, here + pad
    offset = [0.5 * f - 0.5 + pad for f in factor]
    return ndimage.affine_transform(padded, factor, offset=offset, output_shape=tuple(shape), output=dtype,
                                    order=order, mode="nearest", prefilter=False)


# one slab of the axis-by-axis resize holds at most this many float64 values (16 M: 128 MB)
SLAB_VALUES = 16 * 1024 * 1024


CUBIC_POLE = math.sqrt(3.0) - 2.0


def _cubic_prefilter(c: np.ndarray) -> None:
    """SciPy's order-3 ``spline_filter1d(c, axis=0, mode="nearest")``, in place on float64 ``c``,
    every line along axis 0 at once (SciPy filters line by line, and along a slow axis 3x slower).

    The same operations in the same order as ``ni_splines.c`` (``apply_filter`` with the reflect
    initialisation that mode "nearest" uses): the gain, the causal initialisation, the forward
    recursion, the anticausal initialisation and the backward recursion. The initial sum stops once
    the pole's power is below 1e-18 (SciPy goes on into subnormal numbers, which add nothing).
    """
    z = CUBIC_POLE
    n = c.shape[0]
    c *= (1.0 - z) * (1.0 - 1.0 / z)
    if n == 1:
        return
    z_n = z ** n
    c0 = c[0].copy()
    acc = c[0] + z_n * c[n - 1]
    z_i = z
    tmp = np.empty_like(c[0])
    for i in range(1, n):
        if abs(z_i) < 1e-18:
            break
        np.multiply(c[n - 1 - i], z_n, out=tmp)
        tmp += c[i]
        tmp *= z_i
        acc += tmp
        z_i *= z
    acc *= z / (1.0 - z_n * z_n)
    acc += c0
    c[0] = acc
    for i in range(1, n):
        np.multiply(c[i - 1], z, out=tmp)
        c[i] += tmp
    c[n - 1] *= z / (z - 1.0)
    for i in range(n - 2, -1, -1):
        np.subtract(c[i + 1], c[i], out=c[i])
        c[i] *= z


def _zoom_cubic_by_axis(image: np.ndarray, shape, dtype) -> np.ndarray:
    """``_zoom_spline`` of order 3, one axis at a time: the same numbers (to float64 rounding), in a
    third of the time and without a whole-scan float64 copy.

    A tensor-product B-spline separates: filtering the scan along every axis and interpolating in 3-D
    equals filtering and interpolating along one axis, then the next, on data already resized along
    the first (edge replication along one axis commutes with work along another). Axes that shrink
    most go first, so the later ones work on less data; each axis works in slabs of at most
    ``SLAB_VALUES`` float64 values. Random values on 512 x 300 x 512 to nnU-Net's 148 x 154 x 148
    (2 cores, while other work ran): 1.6 s against 3.7 s, with slabs of 128 MB in place of the 3-D
    filter's padded float64 copy (745 MB); 5 of 3.4 M float32 values differ, by 1 unit in the last
    place.
    """
    pad = SPLINE_PAD
    x = image
    axes = sorted(range(image.ndim), key=lambda a: shape[a] / image.shape[a])
    for step, axis in enumerate(axes):
        n_in, n_out = x.shape[axis], int(shape[axis])
        if n_in == n_out:
            continue  # interpolating a spline at its own knots gives the data back
        factor = n_in / n_out
        coords = (np.arange(n_out) + 0.5) * factor - 0.5 + pad  # grid mode, in the padded line
        base = np.floor(coords)
        t = coords - base
        first = base.astype(np.intp) - 1
        weights = [(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                   (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6]
        moved = np.moveaxis(x, axis, 0)  # a view: the axis being resized first
        rest = moved.shape[1:]
        out = np.empty((n_out, *rest), np.float64 if step < len(axes) - 1 else dtype)
        per_row = (n_in + 2 * pad) * int(np.prod(rest[1:], dtype=np.int64))
        rows = max(1, SLAB_VALUES // max(1, per_row))
        for r in range(0, rest[0], rows):
            chunk = moved[:, r:r + rows]
            line = np.empty((n_in + 2 * pad, *chunk.shape[1:]), np.float64)
            line[pad:pad + n_in] = chunk
            line[:pad] = line[pad]
            line[pad + n_in:] = line[pad + n_in - 1]
            _cubic_prefilter(line)
            expand = (slice(None),) + (None,) * (line.ndim - 1)
            acc = weights[0][expand] * line[first]
            for k in range(1, 4):
                acc += weights[k][expand] * line[first + k]
            out[:, r:r + rows] = acc
        x = np.moveaxis(out, 0, axis)
    if x is image:  # no axis changed size
        return np.array(image, dtype)
    return np.ascontiguousarray(x, dtype)


def separate_z(current_spacing, new_spacing, force: bool | None) -> int | None:
    """nnU-Net's choice of a low-resolution axis resampled apart (``determine_do_sep_z_and_axis``)."""
    def lowres(spacing):
        axes = np.where(max(spacing) / np.asarray(spacing) == 1)[0]
        return int(axes[0]) if len(axes) == 1 else None

    if force is not None:
        return lowres(current_spacing) if force else None
    if max(current_spacing) / min(current_spacing) > ANISO_THRESHOLD:
        return lowres(current_spacing)
    if max(new_spacing) / min(new_spacing) > ANISO_THRESHOLD:
        return lowres(new_spacing)
    return None


def resample(data: np.ndarray, new_shape, axis: int | None, order: int, order_z: int,
             dtype=np.float32) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` for images/probabilities: (C, a, b, c) -> (C, *new_shape)."""
    from scipy import ndimage

    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = _resize(data[c], new_shape, order, dtype)
            continue
        inplane = [s for a, s in enumerate(new_shape) if a != axis]
        tmp_shape = list(new_shape)
        tmp_shape[axis] = data.shape[axis + 1]
        tmp = np.zeros(tmp_shape)
        for i in range(data.shape[axis + 1]):
            index: list[slice | int] = [slice(None)] * 3
            index[axis] = i
            tmp[tuple(index)] = _resize(data[c][tuple(index)], inplane, order)
        if tmp.shape[axis] != new_shape[axis]:
            scale = [t / n for t, n in zip(tmp.shape, new_shape)]
            coords = np.meshgrid(*[s * (np.arange(n) + 0.5) - 0.5 for s, n in zip(scale, new_shape)],
                                 indexing="ij")
            out[c] = ndimage.map_coordinates(tmp, coords, order=order_z, mode="nearest")
        else:
            out[c] = tmp
    return out


def normalize(data: np.ndarray, mask: np.ndarray | None, section: dict[str, Any]) -> np.ndarray:
    """nnU-Net's per-channel normalisation (in place on float32 ``data``); ``mask`` (the filled
    non-zero mask) is read only by channels with ``use_mask_for_norm``."""
    for c, scheme in enumerate(section["normalization_schemes"]):
        x = data[c]
        props = section["intensity_properties"][c]
        if scheme == "CTNormalization":
            np.clip(x, props["percentile_00_5"], props["percentile_99_5"], out=x)
            x -= props["mean"]
            x /= max(props["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            if section["use_mask_for_norm"][c]:
                assert mask is not None, "the caller computes the mask when a channel uses it"
                values = x[mask]
                mean, std = values.mean(), values.std()
                x[mask] = (x[mask] - mean) / max(std, 1e-8)
                x[~mask] = 0
            else:
                mean, std = x.mean(), x.std()
                x -= mean
                x /= max(std, 1e-8)
        elif scheme == "RescaleTo01Normalization":
            x -= x.min()
            x /= np.clip(x.max(), a_min=1e-8, a_max=None)
    return data


def _nonzero_box(data: np.ndarray, need_mask: bool = True):
    """nnU-Net's ``crop_to_nonzero`` box (and mask): non-zero in any channel, holes filled.

    Filling holes adds only voxels the mask encloses, inside its bounding box, so the box is that of
    the mask as it is; the filled mask, which only a normalisation with ``use_mask_for_norm`` reads,
    is made only when ``need_mask`` (None otherwise: for CT, 0.6 s less on 512 x 512 x 300).
    """
    from scipy.ndimage import binary_fill_holes

    from .boxes import bounding_box

    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    box = bounding_box(mask, margin=0)
    if box is None:
        box = tuple(slice(0, s) for s in mask.shape)
    return box, binary_fill_holes(mask[box]) if need_mask else None


def _grid_geometry(reference, box_kji, new_shape_kji):
    """An empty image placing the resampled voxels where nnU-Net's resize puts them.

    ``resize`` aligns voxel edges: output voxel o sits at input coordinate (o + 0.5) * f - 0.5 with
    f = old / new size. Same direction as the scan, so mapping back is axis-aligned.
    """
    import SimpleITK as sitk

    size_ijk = [int(s) for s in new_shape_kji[::-1]]
    old_ijk = [b.stop - b.start for b in box_kji[::-1]]
    start_ijk = [b.start for b in box_kji[::-1]]
    factor = [o / n for o, n in zip(old_ijk, size_ijk)]
    grid = sitk.Image(size_ijk, sitk.sitkUInt8)
    grid.SetSpacing([s * f for s, f in zip(reference.GetSpacing(), factor)])
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint(
        [s + 0.5 * f - 0.5 for s, f in zip(start_ijk, factor)]))
    return grid


def prepare(images: list, section: dict[str, Any]):
    """nnU-Net's preprocessing of one scan; returns ``Prepared`` with the array in network layout.

    ``Prepared.array`` is (C, ...) in nnU-Net's transposed axis order; ``Prepared.grid`` is the
    resampled grid in the scan's own axis order (what ``run_windows`` transposes the logits back to).
    """
    import SimpleITK as sitk

    from .preprocess import Prepared

    first = images[0]
    for image in images[1:]:
        if image.GetSize() != first.GetSize() or not np.allclose(image.GetSpacing(), first.GetSpacing()):
            raise UNetSegError("nnU-Net models need all input channels on the same grid (size and "
                               "spacing); resample them onto the first channel first.")
    arrays = [sitk.GetArrayViewFromImage(image).astype(np.float32) for image in images]
    data = arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # no second copy of one channel
    del arrays
    spacing_kji = list(first.GetSpacing())[::-1]
    box, mask = _nonzero_box(data, need_mask=any(section["use_mask_for_norm"]))
    data = data[(slice(None), *box)]
    crop_shape = data.shape[1:]
    forward = section["transpose_forward"]
    data = np.ascontiguousarray(data.transpose([0, *[a + 1 for a in forward]]))
    mask = mask.transpose(forward) if mask is not None else None
    current = [spacing_kji[a] for a in forward]
    target = section["spacing"]
    new_shape = [int(round(c / t * s)) for c, t, s in zip(current, target, data.shape[1:])]
    normalize(data, mask, section)
    del mask  # only the normalisation reads it; the resize below is the run's peak
    kw = section["resampling_data"]
    axis = separate_z(current, target, kw.get("force_separate_z"))
    data = resample(data, new_shape, axis, int(kw.get("order", 3)), int(kw.get("order_z", 0)))
    backward = section["transpose_backward"]
    grid = _grid_geometry(first, box, [new_shape[a] for a in backward])
    prepared = Prepared(data, grid, Box.from_slices_kji(box), first)
    prepared.nnunet = {"current_spacing": current, "crop_shape": crop_shape}  # type: ignore[attr-defined]
    return prepared


# ---- sliding windows, exactly as nnU-Net ----------------------------------------------------------
def window_starts(image_size, tile_size, step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``."""
    steps = []
    for size, tile in zip(image_size, tile_size):
        n = int(np.ceil((size - tile) / (tile * step))) + 1
        actual = (size - tile) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


@functools.lru_cache(maxsize=4)
def _gaussian(tile_size: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    # nnU-Net filters a delta in 3-D (scipy's gaussian_filter: one correlate1d per axis). A delta
    # filtered along an axis is one kernel weight times the value, the zeros adding nothing, so the
    # result is the outer product of the three 1-D filtered deltas, multiplied in the same order:
    # the same float64 numbers, bit for bit (at 128^3 the 3-D filter takes 0.45 s, the three 1-D
    # ones under 0.01 s once the memory is warm; the whole function 0.13 s on a busy machine)
    g = np.ones((1,) * len(tile_size))
    for axis, size in enumerate(tile_size):
        delta = np.zeros(size)
        delta[size // 2] = 1
        shape = [1] * len(tile_size)
        shape[axis] = size
        g = g * gaussian_filter1d(delta, size * sigma_scale, mode="constant", cval=0).reshape(shape)
    g /= g.max() / value_scaling_factor
    # via float32, as torch's ``.to(torch.float16)`` in nnU-Net converts (a direct float64 -> float16
    # rounding differs by one unit in the last place on some weights: 100 of 40 x 224 x 192)
    g = g.astype(np.float32).astype(np.float16)
    g[g == 0] = g[g > 0].min()
    return g


def gaussian(tile_size, sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10) -> np.ndarray:
    """nnU-Net's ``compute_gaussian``, in float16 as nnU-Net's predictor uses it (a copy of the
    cached one: 4 MB at 128^3)."""
    return _gaussian(tuple(int(t) for t in tile_size), float(sigma_scale), float(value_scaling_factor)).copy()


def mirror_combinations(axes: list[int]) -> list[tuple[int, ...]]:
    """No flip, then every combination of the allowed axes (tensor dims of (B, C, ...))."""
    dims = [a + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def run_windows(predictor, array: np.ndarray, sw_device: str, report, is_cancelled) -> np.ndarray:
    """Mean logits over folds and mirrors, in the scan's axis order (C, z, y, x) on the model grid."""
    import torch

    from .errors import CancelledError
    from .runtimes import after_scan

    model = predictor.model
    section = model.meta["nnunet"]
    runners = predictor.networks if predictor.runtime == "torch" else predictor.window_runners
    tile = section["patch_size"]
    shape = array.shape[1:]
    padded_shape = [max(s, t) for s, t in zip(shape, tile)]
    pad = [((p - s) // 2, p - s - (p - s) // 2) for s, p in zip(shape, padded_shape)]
    data = np.pad(array, [(0, 0)] + pad, mode="constant") if any(sum(p) for p in pad) else array
    starts = window_starts(padded_shape, tile, section["step_size"])
    flips = mirror_combinations(section["mirror_axes"]) if predictor.mirror else [()]
    # nnU-Net accumulates the weighted logits in float16 (also on the CPU); so do we, for the same
    # rounding near ties (and half the memory of float32)
    weight = torch.from_numpy(gaussian(tile))
    weight32 = weight.float()  # float16 -> float32 is exact: the same products, without the casts
    n_classes = model.out_channels
    windows = list(itertools.product(*starts))
    batch = max(1, predictor.sw_batch_size or len(flips))
    total = max(1, len(windows) * len(runners) * len(flips))
    done = 0
    x = torch.from_numpy(data)
    logits = torch.zeros((n_classes, *padded_shape), dtype=torch.float16)
    norm = torch.zeros(padded_shape, dtype=torch.float16)
    with torch.inference_mode():
        for corner in windows:
            sl = tuple(slice(c, c + t) for c, t in zip(corner, tile))
            patch = x[(slice(None), *sl)][None]
            summed = None  # the window's logits summed over networks and mirrors (float32)
            for runner in runners:
                # each mirror is its own input; several go to the network as one batch
                for first in range(0, len(flips), batch):
                    group = flips[first:first + batch]
                    if is_cancelled():
                        raise CancelledError()
                    inputs = torch.cat([torch.flip(patch, f) if f else patch for f in group])
                    out = runner(inputs.to(sw_device)).float().cpu()
                    for i, f in enumerate(group):
                        one = torch.flip(out[i:i + 1], f)[0] if f else out[i]
                        if summed is None:  # the first output itself, not a sum into zeros
                            summed = one if one.is_contiguous() else one.clone()
                        else:
                            summed += one
                    done += len(group)
                    report("inference", min(1.0, done / total))
            assert summed is not None  # every window has at least one network and one mirror
            if len(flips) * len(runners) > 1:
                summed /= len(flips) * len(runners)
            logits[(slice(None), *sl)] += summed.mul_(weight32)
            norm[sl] += weight
    after_scan(runners)
    torch.div(logits, norm, out=logits)
    del norm
    unpad = tuple(slice(a, a + s) for (a, _), s in zip(pad, shape))
    logits = logits[(slice(None), *unpad)]
    backward = section["transpose_backward"]
    # float32 in the scan's axis order, written channel by channel: one copy, not two
    out = np.empty((n_classes, *[shape[a] for a in backward]), np.float32)
    for c in range(n_classes):
        out[c] = logits[c].numpy().transpose(backward)
    return out


def foreground_mask(logits: np.ndarray) -> np.ndarray:
    """Model-grid voxels whose most likely class is not background (for the region box)."""
    return _argmax(logits) != 0


def _argmax(stack: np.ndarray) -> np.ndarray:
    from .inputgrid import argmax_first_axis

    return argmax_first_axis(stack, np.uint16)


def needs_separate_z_export(prepared, section: dict[str, Any]) -> int | None:
    """The axis (scan order) nnU-Net resamples apart when exporting, if it does for this scan."""
    info = prepared.nnunet
    kw = section["resampling_probabilities"]
    axis = separate_z(section["spacing"], info["current_spacing"], kw.get("force_separate_z"))
    return None if axis is None else section["transpose_forward"][axis]


def export_separate_z(logits: np.ndarray, prepared, section: dict[str, Any], is_cancelled):
    """Class index on the crop box, for scans nnU-Net exports with a separate low-resolution axis:
    its own resampling (in-plane order 1, order 0 across), one class at a time, running argmax."""
    from .errors import CancelledError

    kw = section["resampling_probabilities"]
    forward = section["transpose_forward"]
    info = prepared.nnunet
    target_shape = [info["crop_shape"][a] for a in forward]
    axis = separate_z(section["spacing"], info["current_spacing"], kw.get("force_separate_z"))
    best: np.ndarray | None = None
    index: np.ndarray | None = None
    for c in range(logits.shape[0]):
        if is_cancelled():
            raise CancelledError()
        channel = logits[c].transpose(forward)[None]
        r = resample(channel, target_shape, axis, int(kw.get("order", 1)), int(kw.get("order_z", 0)))
        r = r[0].transpose(section["transpose_backward"])
        if best is None or index is None:
            best, index = r, np.zeros(r.shape, np.uint16)
        else:
            take = r > best
            best[take] = r[take]
            index[take] = c
    return index


# ---- for tests and the benchmark ------------------------------------------------------------------
def write_random_folder(plans_file: Path, dataset_file: Path, out: Path, configuration: str = "3d_fullres",
                        seed: int = 0, trainer: str = "nnUNetTrainer") -> Path:
    """An nnU-Net trained-model folder with nnU-Net's He initialisation (fixed seed) as its weights.

    What nnU-Net's trainer would save at epoch 0: lets the benchmark time a full-size network and the
    tests check agreement where every class appears. Returns the ``<Trainer>__<Plans>__<config>`` folder.
    """
    import torch
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    plans = json.loads(Path(plans_file).read_text())
    dataset = json.loads(Path(dataset_file).read_text())
    config = resolve_configuration(plans, configuration)
    n_classes = len([k for k in dataset["labels"] if k != "ignore"])
    n_inputs = len(dataset["channel_names"])
    torch.manual_seed(seed)
    network = build_network(network_description(config), n_inputs, n_classes)
    network.apply(InitWeights_He(1e-2))
    folder = Path(out) / f"{trainer}__{plans['plans_name']}__{configuration}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    checkpoint = {"network_weights": network.state_dict(), "optimizer_state": None,
                  "grad_scaler_state": None, "logging": {}, "_best_ema": None, "current_epoch": 0,
                  "init_args": {"plans": plans, "configuration": configuration, "fold": 0,
                                "dataset_json": dataset, "device": "cpu"},
                  "trainer_name": trainer,
                  "inference_allowed_mirroring_axes": tuple(range(len(config["patch_size"])))}
    torch.save(checkpoint, folder / "fold_0" / CHECKPOINT_NAME)
    return folder


# ---- several models, one segmentation ---------------------------------------------------------------
MEMBER_KEYS = ("network", "preprocessing", "inference", "output", "labels", "weights", "nnunet")


def write_merged(folder: str | os.PathLike, members: list, model_id: str, title: str | None = None,
                 version: str = "1.0.0"):
    """A package whose segmentation merges several nnU-Net models' labels (as TotalSegmentator splits
    its classes over five models): each label name once, numbered in the members' order; where two
    members claim a voxel, the more probable label wins (``predict_merged``).

    Every member's weights are copied beside the metadata (``m1-fold_0.pt``, ...); each member's own
    network, preprocessing and labels are kept in ``merge``. The folder must not exist; it is written
    under a temporary name and renamed when complete.
    """
    from .modelpkg import is_nnunet, load_package, publish_staged

    folder = Path(folder)
    if len(members) < 2:
        raise UNetSegError("Merging needs at least two models.")
    if folder.exists():
        raise UNetSegError(f"'{folder}' already exists; choose a new folder for the merged model.")
    for m in members:
        if not is_nnunet(m.meta) or "merge" in m.meta:
            raise UNetSegError(f"Model '{m.id}' is not an imported nnU-Net model; only those merge.")
        if [i["name"] for i in m.meta["inputs"]] != [i["name"] for i in members[0].meta["inputs"]]:
            raise UNetSegError(f"Models '{members[0].id}' and '{m.id}' take different inputs.")
    labels: list[dict[str, Any]] = []
    merge: list[dict[str, Any]] = []
    for index, m in enumerate(members, start=1):
        values = {}
        for label in m.labels:
            known = next((x for x in labels if x["name"] == label["name"]), None)
            if known is None:
                known = dict(label, value=len(labels) + 1)
                labels.append(known)
            values[label["name"]] = known["value"]
        part = {k: m.meta[k] for k in MEMBER_KEYS}
        part["weights"] = [dict(w, file=f"m{index}-{w['file']}") for w in m.weight_files]
        merge.append({"id": m.id, "version": m.meta["version"], "label_values": values, **part})
    first = members[0].meta
    meta = {k: first[k] for k in ("schema_version", "modality", "inputs", *MEMBER_KEYS)}
    meta.update(id=model_id, version=version, labels=labels,
                title=title or " + ".join(m.meta["title"] for m in members),
                licence="; ".join(dict.fromkeys(m.meta["licence"] for m in members)),
                description=(f"{len(members)} nnU-Net models ({', '.join(m.id for m in members)}) "
                             "merged into one segmentation; overlaps go to the more probable label."),
                weights=[w for part in merge for w in part["weights"]], merge=merge)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for index, m in enumerate(members, start=1):
            for w in m.weight_files:
                shutil.copy2(m.path / w["file"], staging / f"m{index}-{w['file']}")
        publish_staged(staging, folder, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_package(folder)


def member_packages(package) -> list:
    """The member models of a merged package, as packages sharing its folder (and weights)."""
    from .modelpkg import ModelPackage, validate_metadata

    members = []
    for part in package.meta["merge"]:
        meta = dict(package.meta)
        meta.pop("merge")
        meta.update({k: part[k] for k in MEMBER_KEYS}, id=part["id"], version=part["version"])
        meta["weights"] = part["weights"] if len(part["weights"]) > 1 else part["weights"][0]
        validate_metadata(meta, f"member '{part['id']}' of {package.path}")
        members.append((ModelPackage(package.path, meta), part["label_values"]))
    return members


def predict_merged(predictor, images, progress=None, cancel=None):
    """Run each member with its own predictor and merge: per voxel, the member label whose softmax
    probability there (linearly interpolated from its model grid) is highest."""
    import SimpleITK as sitk

    from .inference import SegmentationResult
    from .preprocess import box_reference

    reference = images[0]
    size_kji = reference.GetSize()[::-1]
    out = np.zeros(size_kji, np.uint8 if len(predictor.model.labels) < 255 else np.uint16)
    best = np.zeros(size_kji, np.float32)
    timings: dict[str, float] = {}
    messages: list[str] = []
    for sub, values in predictor.members:
        keep: dict[str, Any] = {}
        original = sub._to_input_grid

        def capture(probs, prepared, is_cancelled, original=original, keep=keep):
            keep["probs"], keep["prepared"] = probs, prepared
            return original(probs, prepared, is_cancelled)

        sub._to_input_grid = capture  # the member's logits on its model grid, for the scores
        try:
            result = sub.predict(images, progress=progress, cancel=cancel)
        finally:
            del sub._to_input_grid
        for k, v in result.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        messages += [m for m in result.messages if m not in messages]
        labels = sitk.GetArrayViewFromImage(result.label_map)
        lut = np.zeros(max(label["value"] for label in sub.model.labels) + 1, out.dtype)
        for label in sub.model.labels:
            lut[label["value"]] = values[label["name"]]
        logits, prepared = keep["probs"], keep["prepared"]
        score = np.exp(logits - logits.max(axis=0))
        score = 1.0 - score[0] / score.sum(axis=0)  # probability of not background
        image = sitk.GetImageFromArray(score.astype(np.float32))
        image.CopyInformation(prepared.grid)
        from .boxes import bounding_box

        box = bounding_box(labels != 0, margin=0)
        if box is None:
            continue
        ref = box_reference(reference, Box.from_slices_kji(box))
        p = sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                 sitk.sitkFloat32))
        region, region_best, mine = out[box], best[box], labels[box]
        take = (mine != 0) & (p > region_best)
        region[take] = lut[mine[take]]
        region_best[take] = p[take]
    label_map = sitk.GetImageFromArray(out)
    label_map.CopyInformation(reference)
    return SegmentationResult(label_map, predictor.model, None, timings, predictor.device, messages,
                              predictor.runtime)
