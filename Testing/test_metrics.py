"""Metrics against hand-computed cases, including empty prediction and empty reference."""

import math

import numpy as np
import pytest

from unetseg_engine.evaluate import summarize
from unetseg_engine.metrics import dice, hd95, iou, label_metrics


def cube(shape=(10, 10, 10), lo=(2, 2, 2), hi=(5, 5, 5)):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_dice_and_iou_of_overlapping_cubes_by_hand():
    a = cube(hi=(4, 4, 4))            # 2x2x2 = 8 voxels
    b = cube(lo=(3, 2, 2), hi=(5, 4, 4))  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert iou(a, b) == pytest.approx(4 / 12)


def test_empty_prediction_and_empty_reference():
    empty, full = np.zeros((5, 5, 5), bool), cube((5, 5, 5), (1, 1, 1), (3, 3, 3))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0
    assert math.isnan(hd95(empty, full)) and math.isnan(hd95(full, empty))


def test_hd95_is_a_shift_in_millimetres_with_anisotropic_spacing():
    a = cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    b = np.roll(a, 3, axis=0)  # 3 slices along z
    assert hd95(a, b, spacing_zyx=(2.5, 1.0, 1.0)) == pytest.approx(7.5)
    assert hd95(a, a, spacing_zyx=(2.5, 1.0, 1.0)) == 0.0


def test_volume_difference_in_millilitres():
    a = cube((10, 10, 10), (0, 0, 0), (10, 10, 10))   # 1000 voxels of 2 mm^3
    b = cube((10, 10, 10), (0, 0, 0), (5, 10, 10))    # 500 voxels
    m = label_metrics(b, a, spacing_zyx=(2.0, 1.0, 1.0))
    assert m["volume_ref_ml"] == pytest.approx(2.0) and m["volume_pred_ml"] == pytest.approx(1.0)
    assert m["volume_diff_ml"] == pytest.approx(-1.0) and m["dice"] == pytest.approx(2 / 3)


def test_summary_leaves_undefined_hd95_out_of_the_mean():
    cases = [{"labels": {"A": {"dice": 1.0, "iou": 1.0, "hd95_mm": 2.0, "volume_diff_ml": 0.0}}},
             {"labels": {"A": {"dice": 0.0, "iou": 0.0, "hd95_mm": float("nan"),
                               "volume_diff_ml": -3.0}}}]
    s = summarize(cases, ["A"])
    assert s["per_label"]["A"]["dice"] == 0.5 and s["per_label"]["A"]["hd95_mm"] == 2.0
    assert s["mean_dice"] == 0.5 and s["min_dice"] == 0.5
