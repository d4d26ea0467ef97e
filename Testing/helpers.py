"""Shared test helpers: where the real data is, and small real model packages.

The packages built here are real: a MONAI network, randomly initialised with a fixed seed, saved and
loaded through the engine's own package code (schema, SHA-256, weights_only). Nothing is stubbed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


def data_root() -> Path:
    return Path(os.environ.get("UNETSEG_DATA", DEFAULT_DATA))


def data_path(*parts: str) -> Path:
    """A path under the shared data folder; skips the test (saying why) when it is not there."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path}: set UNETSEG_DATA to the shared data folder "
                    "(it holds openkbp_hn_oar/, totalsegmentator_example_ct/, ...)")
    return path


def openkbp(case: str = "pt_201") -> tuple[Path, Path]:
    """(CT, label) paths of an OpenKBP case."""
    root = data_path("openkbp_hn_oar")
    return root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz"


OPENKBP_LABELS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                  "Mandible"]


def tiny_meta(model_id: str = "tiny-test", *, multilabel: bool = False, n_labels: int = 3,
              n_inputs: int = 1, modality: str = "CT", spatial_dims: int = 3,
              label_names: list[str] | None = None) -> dict:
    """Metadata of a small, fast network (weights are added by ``write_package``)."""
    names = label_names or [f"Structure{i + 1}" for i in range(n_labels)]
    patch = [32, 32, 16] if spatial_dims == 3 else [64, 64, 1]
    norm = {"method": "ct_window", "level": 40, "width": 400} if modality == "CT" else \
        {"method": "zscore"}
    crop = {"enabled": True, "threshold": -500.0, "margin_mm": 10.0} if modality == "CT" else \
        {"enabled": False, "threshold": None, "margin_mm": 0.0}
    return {
        "schema_version": 1, "id": model_id, "version": "0.0.1", "title": "Tiny test model",
        "description": "Randomly initialised network for tests", "licence": "Apache-2.0",
        "modality": modality, "inputs": [{"name": f"channel{i}"} for i in range(n_inputs)],
        "network": {"architecture": "UNet", "spatial_dims": spatial_dims,
                    "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}},
        "preprocessing": {"spacing_mm": [6.0, 6.0, 6.0], "normalization": norm,
                          "foreground_crop": crop},
        "inference": {"patch_size": patch, "overlap": 0.25, "sw_batch_size": 2},
        "output": {"type": "multilabel" if multilabel else "multiclass"},
        "labels": [{"value": i + 1, "name": n, "color": [40 * i % 256, 200, 100],
                    "terminology": {"category": {"scheme": "SCT", "code": "123037004",
                                                 "meaning": "Anatomical Structure"},
                                    "type": {"scheme": "SCT", "code": "85756007",
                                             "meaning": "Tissue"}}}
                   for i, n in enumerate(names)],
    }


def make_package(folder: Path, meta: dict, seed: int = 0, bias: dict[int, float] | None = None):
    """Build the network of ``meta`` with a fixed seed and write it as a package.

    ``bias`` adds constants to the final layer's bias per output channel, so a random network still
    predicts some voxels of every class (useful to exercise multi-label overlaps).
    """
    import torch

    from unetseg_engine.modelpkg import write_package
    from unetseg_engine.networks import build_network

    torch.manual_seed(seed)
    n_out = len(meta["labels"]) + (0 if meta["output"]["type"] == "multilabel" else 1)
    net = meta["network"]
    model = build_network(net["architecture"], net["spatial_dims"], len(meta["inputs"]), n_out,
                          net["params"])
    state = model.state_dict()
    if bias:
        last_bias = [k for k in state if k.endswith("bias") and state[k].numel() == n_out][-1]
        for channel, value in bias.items():
            state[last_bias][channel] += value
    return write_package(folder, meta, state)
