"""Experiment planning from a dataset fingerprint, after nnU-Net's rules, with every choice overridable.

- Spacing: the median spacing; if the coarsest axis is over 3x the finest, that axis takes the 10th
  percentile instead (nnU-Net's rule against very anisotropic grids).
- Patch size: the median foreground extent at that spacing, shrunk (largest axis first) until it fits a
  voxel budget (smaller on CPU), rounded to the network's divisibility.
- Depth: as many stride-2 levels (up to 5) as keep every patch axis at least 4 voxels at the bottom.
- Normalisation: CT gets a window from the 0.5-99.5 percentiles of the intensities inside the labels;
  other modalities a z-score.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import UNetSegError
from ..networks import ARCHITECTURES

CPU_PATCH_VOXELS = 96 * 96 * 64
GPU_PATCH_VOXELS = 128 * 128 * 128


def _round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value // multiple) * multiple)


def plan_experiment(fp: dict[str, Any], modality: str, *, architecture: str = "UNet",
                    spatial_dims: int = 3, spacing: list[float] | None = None,
                    patch_size: list[int] | None = None, window: tuple[float, float] | None = None,
                    base_features: int = 16, gpu: bool = False) -> dict[str, Any]:
    """Return the plan: preprocessing, network and patch size (all axes in (x, y, z) order)."""
    if architecture not in ARCHITECTURES:
        raise UNetSegError(f"Unknown architecture '{architecture}'. Choose from {list(ARCHITECTURES)}.")
    if spacing is None:
        spacing = list(fp["spacing_median"])
        if max(spacing) > 3 * min(spacing):
            axis = spacing.index(max(spacing))
            spacing[axis] = fp["spacing_p10"][axis]
    extent = [e / s for e, s in zip(fp["extent_mm_median"], spacing)]
    budget = GPU_PATCH_VOXELS if gpu else CPU_PATCH_VOXELS
    if spatial_dims == 2:
        budget = budget // 8  # a 2D patch is one slice, so spend the budget in plane
    divisor = 16
    if patch_size is None:
        size = [float(e) for e in extent]
        if spatial_dims == 2:
            size[2] = 1
        axes = [0, 1] if spatial_dims == 2 else [0, 1, 2]
        while math.prod(size) > budget:
            largest = max(axes, key=lambda a: size[a])
            size[largest] *= 0.9
        patch_size = [_round_down(s, divisor) if a in axes else 1 for a, s in enumerate(size)]
    depth = min(5, min(int(math.log2(max(p, 1) / 4)) for p in patch_size if p > 1) + 1)
    depth = max(depth, 3)
    features = [base_features * 2**i for i in range(depth)]
    strides = [2] * (depth - 1)
    params: dict[str, Any]
    if architecture in ("UNet", "AttentionUnet"):
        params = {"channels": features, "strides": strides}
        if architecture == "UNet":
            params.update(num_res_units=2, norm="instance")
    elif architecture == "DynUNet":
        k = [3] * spatial_dims
        params = {"kernel_size": [k] * depth, "strides": [[1] * spatial_dims] +
                  [[2] * spatial_dims] * (depth - 1), "upsample_kernel_size":
                  [[2] * spatial_dims] * (depth - 1), "filters": features, "norm_name": "instance",
                  "deep_supervision": False}
    elif architecture in ("BasicUNet", "BasicUNetPlusPlus"):
        params = {"features": (features + [features[-1]] * 5)[:5] + [features[0]]}
    elif architecture == "SegResNet":
        params = {"init_filters": base_features}
    else:  # VNet has a fixed layout
        params = {}
    if modality == "CT":
        if window is None:
            lo, hi = fp["foreground_intensity"]["p00_5"], fp["foreground_intensity"]["p99_5"]
            window = ((lo + hi) / 2.0, hi - lo)
        normalization = {"method": "ct_window", "level": round(float(window[0]), 1),
                         "width": round(float(window[1]), 1)}
        crop: dict[str, Any] = {"enabled": True, "threshold": -500.0, "margin_mm": 10.0}
    else:
        normalization = {"method": "zscore"}
        crop = {"enabled": False, "threshold": None, "margin_mm": 0.0}
    return {
        "preprocessing": {"spacing_mm": [round(float(s), 4) for s in spacing],
                          "normalization": normalization, "foreground_crop": crop},
        "network": {"architecture": architecture, "spatial_dims": spatial_dims, "params": params},
        "patch_size": [int(p) for p in patch_size],
    }
