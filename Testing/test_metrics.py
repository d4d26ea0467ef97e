"""Metrics against hand-computed cases, including empty prediction and empty reference."""

import math

import numpy as np
import pytest

from unetseg_engine.evaluate import summarize
from unetseg_engine.metrics import (
    added_path_length,
    dice,
    edit_metrics,
    hd95,
    iou,
    label_metrics,
    surface_dice,
)


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
    cases = [{"labels": {"A": {"dice": 1.0, "iou": 1.0, "hd95_mm": 2.0, "surface_dice": 1.0,
                               "apl_mm": 0.0, "volume_diff_ml": 0.0}}},
             {"labels": {"A": {"dice": 0.0, "iou": 0.0, "hd95_mm": float("nan"), "surface_dice": 0.0,
                               "apl_mm": 40.0, "volume_diff_ml": -3.0}}}]
    s = summarize(cases, ["A"])
    assert s["per_label"]["A"]["dice"] == 0.5 and s["per_label"]["A"]["hd95_mm"] == 2.0
    assert s["mean_dice"] == 0.5 and s["min_dice"] == 0.5


# ---- editing effort: surface Dice, added path length, added/removed volume ----------------------
SPACING = (2.5, 0.8, 0.8)  # (z, y, x) mm: thick slices, fine pixels, as in a planning CT


def test_added_path_length_of_a_cube_shifted_one_voxel_by_hand():
    """A 4x4 square per slice has 12 boundary pixels. Shifted one pixel sideways, 6 of the corrected
    boundary pixels (the top and bottom rows, less the new corner column) lie on the old contour: 6
    added on each of the 4 slices. Shifted one slice along z, only the new slice is drawn (12)."""
    a = cube((20, 20, 20), (2, 2, 2), (6, 6, 6))
    assert added_path_length(a, a, SPACING) == 0.0
    assert added_path_length(a, np.roll(a, 1, axis=2), SPACING) == pytest.approx(4 * 6 * 0.8)
    assert added_path_length(a, np.roll(a, 1, axis=0), SPACING) == pytest.approx(12 * 0.8)
    assert added_path_length(np.zeros_like(a), a, SPACING) == pytest.approx(4 * 12 * 0.8)  # all drawn
    assert added_path_length(a, np.zeros_like(a), SPACING) == 0.0  # deleting draws nothing
    # within a 1 mm tolerance a one-pixel (0.8 mm) shift needs no drawing; within 0.5 mm it does
    assert added_path_length(a, np.roll(a, 1, axis=2), SPACING, tolerance_mm=1.0) == 0.0
    assert added_path_length(a, np.roll(a, 1, axis=2), SPACING, tolerance_mm=0.5) == \
        pytest.approx(4 * 6 * 0.8)


def test_cutting_a_piece_off_adds_the_new_border_only():
    a = cube((20, 20, 20), (2, 2, 2), (6, 6, 6))
    cut = a.copy()
    cut[:, 5, :] = False  # the last row of every slice erased: the new last row (2 inner pixels) is drawn
    assert added_path_length(a, cut, SPACING) == pytest.approx(4 * 2 * 0.8)
    top = a.copy()
    top[5] = False  # a whole slice deleted: nothing to draw
    assert added_path_length(a, top, SPACING) == 0.0


def test_surface_dice_tolerance_is_in_millimetres():
    a = cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    shifted = np.roll(a, 1, axis=0)  # one 2.5 mm slice
    assert surface_dice(a, a, SPACING) == pytest.approx(1.0)
    assert surface_dice(a, shifted, SPACING, tolerance_mm=2.5) == pytest.approx(1.0)
    partly = surface_dice(a, shifted, SPACING, tolerance_mm=2.0)
    assert 0.5 < partly < 1.0  # the top and bottom faces are 2.5 mm apart, the sides coincide
    assert surface_dice(a, np.roll(a, 1, axis=2), SPACING, tolerance_mm=2.0) == pytest.approx(1.0)
    far = np.roll(a, 10, axis=2)  # 8 mm away, no contact
    assert surface_dice(a, far, SPACING, tolerance_mm=2.0) == 0.0
    empty = np.zeros_like(a)
    assert surface_dice(empty, empty) == 1.0 and surface_dice(a, empty) == 0.0


def test_edit_metrics_of_an_erased_slab_by_hand():
    a = cube((20, 20, 20), (5, 5, 5), (15, 15, 15))  # 1000 voxels of 1.6 mm^3
    corrected = a.copy()
    corrected[13:15] = False  # the top two slices deleted: 200 voxels
    m = edit_metrics(a, corrected, SPACING)
    assert m["dice"] == pytest.approx(2 * 800 / 1800)
    assert m["removed_ml"] == pytest.approx(200 * 1.6 / 1000) and m["added_ml"] == 0.0
    assert m["apl_mm"] == 0.0 and m["hd95_mm"] == pytest.approx(5.0)
    assert m["volume_original_ml"] == pytest.approx(1.6) and m["volume_corrected_ml"] == pytest.approx(1.28)
    grown = a.copy()
    grown[15] = a[14]  # one slice added on top: its whole 10x10 contour (36 pixels) was drawn
    m = edit_metrics(a, grown, SPACING)
    assert m["added_ml"] == pytest.approx(100 * 1.6 / 1000) and m["removed_ml"] == 0.0
    assert m["apl_mm"] == pytest.approx(36 * 0.8)
    assert m["surface_dice"] < 1.0  # the new top face is one 2.5 mm slice above the old one
    assert edit_metrics(a, grown, SPACING, tolerance_mm=2.5)["surface_dice"] == pytest.approx(1.0)


def test_evaluate_folders_reports_surface_dice_and_added_path_length(tmp_path, capsys):
    import csv

    import SimpleITK as sitk

    from unetseg_engine.evaluate import evaluate_folders, print_table

    a = cube((20, 20, 20), (2, 2, 2), (6, 6, 6)).astype(np.uint8)
    for folder, mask in (("pred", a), ("ref", np.roll(a, 1, axis=2))):
        (tmp_path / folder).mkdir()
        image = sitk.GetImageFromArray(mask)
        image.SetSpacing(SPACING[::-1])
        sitk.WriteImage(image, str(tmp_path / folder / "case_1.nrrd"))
    report = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), tmp_path / "out", None)
    assert report["summary"]["per_label"]["label_1"]["apl_mm"] == pytest.approx(4 * 6 * 0.8)
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert float(rows[0]["apl_mm"]) == pytest.approx(19.2)
    assert float(rows[0]["surface_dice"]) == pytest.approx(1.0)  # 0.8 mm apart, within 2 mm
    print_table(report["summary"])
    assert "SDice2mm" in capsys.readouterr().out
