"""Overlap and distance metrics between a predicted and a reference binary mask.

Conventions for empty masks (the cases that make averages lie if left implicit):
- both empty: Dice = IoU = 1, HD95 = 0 (nothing to find, nothing found);
- one empty: Dice = IoU = 0, HD95 = NaN (undefined; reported as missing, never averaged as a number).
HD95 follows MONAI's definition: the larger of the two directed 95th-percentile surface distances, in
mm, using the voxel spacing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, ref).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                    border_value=0)
    return mask & ~eroded


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile Hausdorff distance in mm; arrays in (z, y, x) with ``spacing_zyx``."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return float("nan")
    both = pred | ref
    lo = [int(np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != ax)))[0]) for ax in range(3)]
    hi = [int(np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != ax)))[-1]) + 1
          for ax in range(3)]
    box = tuple(slice(max(0, a - 1), b + 1) for a, b in zip(lo, hi))
    p, r = _surface(pred[box]), _surface(ref[box])
    dist_to_r = ndimage.distance_transform_edt(~r, sampling=spacing_zyx)
    dist_to_p = ndimage.distance_transform_edt(~p, sampling=spacing_zyx)
    return float(max(np.percentile(dist_to_r[p], 95), np.percentile(dist_to_p[r], 95)))


def volume_ml(mask: np.ndarray, spacing_zyx) -> float:
    return float(np.asarray(mask, bool).sum() * np.prod(spacing_zyx) / 1000.0)


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> dict[str, float]:
    """All metrics for one label: Dice, IoU, HD95 (mm), volumes and their difference (ml)."""
    v_pred, v_ref = volume_ml(pred, spacing_zyx), volume_ml(ref, spacing_zyx)
    return {"dice": dice(pred, ref), "iou": iou(pred, ref), "hd95_mm": hd95(pred, ref, spacing_zyx),
            "volume_pred_ml": v_pred, "volume_ref_ml": v_ref, "volume_diff_ml": v_pred - v_ref}
