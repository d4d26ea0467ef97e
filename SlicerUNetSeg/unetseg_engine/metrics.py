"""Overlap and distance metrics between a predicted and a reference binary mask.

Conventions for empty masks (the cases that make averages lie if left implicit):
- both empty: Dice = IoU = 1, HD95 = 0 (nothing to find, nothing found);
- one empty: Dice = IoU = 0, HD95 = NaN (undefined; reported as missing, never averaged as a number).
HD95 follows MONAI's definition: the larger of the two directed 95th-percentile surface distances, in
mm, using the voxel spacing.

Editing-effort measures, for comparing what the AI drew with what a reviewer kept (arrays in (k, j, i)
= (z, y, x) order; the slice axis, on which contours are drawn, is the first one):
- surface Dice at a tolerance (Nikolov et al. 2021, "Clinically applicable segmentation of head and
  neck anatomy for radiotherapy"): the fraction of both surfaces that lies within the tolerance (mm)
  of the other, area-weighted. Computed by MONAI's ``compute_surface_dice`` with ``use_subvoxels``,
  which follows the authors' own implementation (deepmind/surface-distance). Both empty: 1; one empty: 0.
- added path length (Vaassen et al. 2020, "Evaluation of measures for assessing time-saving of
  automatic organ-at-risk segmentation in radiotherapy"): on every slice, the boundary pixels of the
  corrected contour that are not on the automatic contour (within ``tolerance_mm``, 0 by default), times
  the in-plane pixel size, summed over the slices, in mm. A slice the reviewer had to contour from
  scratch adds its whole contour; deleting a slice adds nothing; cutting a piece off adds the new
  border the cut drew.
- added and removed volume (ml): voxels in the corrected mask but not in the automatic one, and the
  other way round.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from .boxes import bounding_box


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


def _union_box(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The bounding box of ``pred | ref`` (not both empty), grown by ``margin`` voxels: the metrics
    below only need the masks' neighbourhood, not the whole scan."""
    box = bounding_box(pred | ref, margin)
    assert box is not None, "both masks are empty"
    return box


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile Hausdorff distance in mm; arrays in (z, y, x) with ``spacing_zyx``."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return float("nan")
    box = _union_box(pred, ref)
    p, r = _surface(pred[box]), _surface(ref[box])
    dist_to_r = ndimage.distance_transform_edt(~r, sampling=spacing_zyx)
    dist_to_p = ndimage.distance_transform_edt(~p, sampling=spacing_zyx)
    return float(max(np.percentile(dist_to_r[p], 95), np.percentile(dist_to_p[r], 95)))


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0),
                 tolerance_mm: float = 2.0) -> float:
    """Surface Dice (normalised surface distance) at ``tolerance_mm``, 0..1 (see the module notes)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    import torch
    from monai.metrics import compute_surface_dice

    box = _union_box(pred, ref)

    def one_hot(mask: np.ndarray):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal call
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(one_hot(pred[box]), one_hot(ref[box]), [float(tolerance_mm)],
                                     spacing=[float(s) for s in spacing_zyx], use_subvoxels=True)
    return float(value.reshape(-1)[0])


def _slice_contours(mask: np.ndarray) -> np.ndarray:
    """Each slice's boundary pixels (in the mask, with a 4-neighbour outside it in the same slice)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # in-plane only: slices are separate
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def added_path_length(pred: np.ndarray, ref: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0),
                      tolerance_mm: float = 0.0) -> float:
    """The contour (mm) a reviewer had to draw to turn ``pred`` (automatic) into ``ref`` (corrected):
    per slice (axis 0), boundary pixels of ``ref`` farther than ``tolerance_mm`` from the boundary of
    ``pred``, times the in-plane pixel size (the mean of the two in-plane spacings)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not ref.any():
        return 0.0
    box = _union_box(pred, ref)
    ref_edge, pred_edge = _slice_contours(ref[box]), _slice_contours(pred[box])
    if tolerance_mm <= 0:
        added = ref_edge & ~pred_edge
    else:
        added = np.zeros_like(ref_edge)
        for k in np.flatnonzero(ref_edge.any(axis=(1, 2))):
            if not pred_edge[k].any():
                added[k] = ref_edge[k]
                continue
            distance = ndimage.distance_transform_edt(~pred_edge[k], sampling=spacing_zyx[1:])
            added[k] = ref_edge[k] & (distance > tolerance_mm)
    pixel_mm = (float(spacing_zyx[1]) + float(spacing_zyx[2])) / 2.0
    return float(added.sum() * pixel_mm)


def volume_ml(mask: np.ndarray, spacing_zyx) -> float:
    return float(np.asarray(mask, bool).sum() * np.prod(spacing_zyx) / 1000.0)


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx,
                  tolerance_mm: float = 2.0) -> dict[str, float]:
    """All metrics for one label: Dice, IoU, HD95 (mm), surface Dice at ``tolerance_mm``, added path
    length (mm, the reference's contour the prediction misses), volumes and their difference (ml)."""
    v_pred, v_ref = volume_ml(pred, spacing_zyx), volume_ml(ref, spacing_zyx)
    return {"dice": dice(pred, ref), "iou": iou(pred, ref), "hd95_mm": hd95(pred, ref, spacing_zyx),
            "surface_dice": surface_dice(pred, ref, spacing_zyx, tolerance_mm),
            "apl_mm": added_path_length(pred, ref, spacing_zyx),
            "volume_pred_ml": v_pred, "volume_ref_ml": v_ref, "volume_diff_ml": v_pred - v_ref}


def edit_metrics(original: np.ndarray, corrected: np.ndarray, spacing_zyx,
                 tolerance_mm: float = 2.0) -> dict[str, float]:
    """What a reviewer changed in one segment: the AI's ``original`` mask against the ``corrected``
    one (Dice, HD95, surface Dice, added path length) and the added and removed volume (ml)."""
    original, corrected = np.asarray(original, bool), np.asarray(corrected, bool)
    return {"dice": dice(original, corrected), "hd95_mm": hd95(original, corrected, spacing_zyx),
            "surface_dice": surface_dice(original, corrected, spacing_zyx, tolerance_mm),
            "apl_mm": added_path_length(original, corrected, spacing_zyx),
            "added_ml": volume_ml(corrected & ~original, spacing_zyx),
            "removed_ml": volume_ml(original & ~corrected, spacing_zyx),
            "volume_original_ml": volume_ml(original, spacing_zyx),
            "volume_corrected_ml": volume_ml(corrected, spacing_zyx)}
