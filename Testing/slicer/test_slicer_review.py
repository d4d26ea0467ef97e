"""Reviewing a result on real MRML: the review table after a real segmentation (real engine, real
worker), jump-to-region geometry in real slice nodes, the kept AI original, the uncertainty overlay,
and the change report after an edit made in the test, checked against numbers computed here with
numpy from Slicer's own export of the segments."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import slicer
import vtk

from SlicerUNetSegLib import review
from SlicerUNetSegLib.geometry import loadVolumeFile
from SlicerUNetSegLib.testing import TINY_LABELS, TINY_MODEL_ID
from unetseg_engine.errors import UNetSegError

pytestmark = pytest.mark.slicer


@pytest.fixture
def ct(scene, openkbp):
    return loadVolumeFile(openkbp[0], "pt_201 CT")


@pytest.fixture
def result(logic, ct):
    """A real segmentation of the real CT, uncertainty map requested."""
    return logic.process(ct, None, TINY_MODEL_ID, device="cpu", uncertainty=True)


def addSliceViews(scene):
    """Red (axial), Yellow (sagittal), Green (coronal), as the application's layout creates them."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        views[orientation] = (node, composite)
    return views


def mask(segmentation, segmentId, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume) > 0


def emptyWindow(volumeMask, size):
    """(k, j, i) of a size x size square of one slice with no voxel of the mask in it."""
    for k in np.argsort(volumeMask.sum(axis=(1, 2))):
        filled = np.pad(volumeMask[k].astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        counts = filled[size:, size:] - filled[:-size, size:] - filled[size:, :-size] + filled[:-size, :-size]
        free = np.argwhere(counts == 0)
        if len(free):
            return (int(k), *map(int, free[len(free) // 2]))
    raise AssertionError("no free window")


def nonEmptySegments(segmentation, volume):
    s = segmentation.GetSegmentation()
    ids = [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]
    return [segmentId for segmentId in ids if mask(segmentation, segmentId, volume).any()]


def test_review_table_after_a_real_segmentation(logic, ct, result):
    rows = logic.reviewRows(result)
    assert [row["name"] for row in rows] == [label["name"] for label in TINY_LABELS]
    voxelMl = np.prod(ct.GetSpacing()) / 1000
    for row in rows:  # volumes from Slicer's own export onto the CT's grid
        assert row["volumeMl"] == pytest.approx(mask(result, row["segmentId"], ct).sum() * voxelMl)
        assert row["reviewed"] is False
    assert any(row["volumeMl"] > 0 for row in rows)
    logic.setSegmentReviewed(result, rows[1]["segmentId"])
    assert [row["reviewed"] for row in logic.reviewRows(result)] == [False, True, False]
    with pytest.raises(UNetSegError, match="No segment"):
        logic.setSegmentReviewed(result, "no-such-segment")
    sent = logic.job.review
    if sent is None:
        pytest.skip("the engine's worker sends no review yet (issue 15, engine half): confidences "
                    "and flags are not checked")
    byName = {entry["name"]: entry for entry in sent}
    for row in rows:  # what the worker sent, per label, lands on the right segment
        entry = byName[row["name"]]
        assert row["confidence"] == pytest.approx(entry["confidence"])
        assert [f["code"] for f in row["flags"]] == [f["code"] for f in entry["flags"]]
        assert row["focusRas"] == entry["focus_ras"]


def test_jump_to_region_moves_every_slice_view_to_the_point(logic, ct, result, scene):
    views = addSliceViews(scene)
    move = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    shift.SetElement(2, 3, -40.0)
    move.SetMatrixTransformToParent(shift)
    ct.SetAndObserveTransformNodeID(move.GetID())
    result.SetAndObserveTransformNodeID(move.GetID())
    sent = {entry["name"]: entry for entry in (logic.job.review or [])}
    for row in logic.reviewRows(result):
        point = logic.jumpToSegment(result, row["segmentId"])
        if point is None:
            assert not mask(result, row["segmentId"], ct).any()  # an empty segment: nowhere to go
            continue
        for axis, (node, _) in zip((2, 0, 1), views.values()):
            sliceToRas = node.GetSliceToRAS()
            normal = np.array([sliceToRas.GetElement(r, 2) for r in range(3)])
            assert abs(normal[axis]) == pytest.approx(1.0)  # axial S, sagittal R, coronal A
            # the slice offset is the point along the view's normal (Slicer's sagittal normal is -R)
            assert node.GetSliceOffset() == pytest.approx(normal @ point, abs=1e-3)
            # centred: the point is in the middle of each view
            assert [sliceToRas.GetElement(r, 3) for r in range(3)] == pytest.approx(point, abs=1e-3)
        local = np.array(point) - [25.0, 0.0, -40.0]  # back into the CT's own frame
        entry = sent.get(row["name"])
        if entry and entry.get("focus_ras") is not None:
            assert local == pytest.approx(entry["focus_ras"], abs=1e-3)
        else:  # the fallback is a voxel of the segment itself
            rasToIjk = vtk.vtkMatrix4x4()
            ct.GetRASToIJKMatrix(rasToIjk)
            i, j, k = (int(round(v)) for v in rasToIjk.MultiplyPoint([*local, 1.0])[:3])
            assert mask(result, row["segmentId"], ct)[k, j, i]


def test_the_ai_original_is_kept_hidden_tagged_and_replaced_with_the_result(logic, ct, result, scene):
    original = logic.originalSegmentation(result)
    assert original is not None and original is not result
    assert original.GetHideFromEditors() and not original.GetDisplayNode().GetVisibility()
    assert original.GetAttribute(review.ORIGINAL_OF_ATTRIBUTE) == result.GetID()
    now, kept = result.GetSegmentation(), original.GetSegmentation()
    assert [now.GetNthSegmentID(i) for i in range(now.GetNumberOfSegments())] == \
        [kept.GetNthSegmentID(i) for i in range(kept.GetNumberOfSegments())]
    for index in range(now.GetNumberOfSegments()):
        segmentId = now.GetNthSegmentID(index)
        assert np.array_equal(mask(result, segmentId, ct), mask(original, segmentId, ct))
        segment = now.GetSegment(segmentId)
        assert review._tag(segment, "DICOM.SegmentAlgorithmType") == "AUTOMATIC"
        assert review._tag(segment, "DICOM.SegmentAlgorithmName") == TINY_MODEL_ID
        assert review._tag(kept.GetSegment(segmentId), review.ORIGINAL_TAG) == "1"
    # an edit of the result does not reach the original
    first = nonEmptySegments(result, ct)[0]
    name = now.GetSegment(first).GetName()
    before = mask(original, first, ct).copy()
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros(before.shape, np.uint8), result, first, ct)
    assert np.array_equal(mask(original, first, ct), before)
    # segmenting again into the same node replaces the original and the map: nothing piles up
    count = scene.GetNumberOfNodes()
    logic.process(ct, result, TINY_MODEL_ID, device="cpu", replaceExisting=True, uncertainty=True)
    assert scene.GetNumberOfNodes() == count
    assert scene.GetNodeByID(original.GetID()) is None
    renewed = logic.originalSegmentation(result)
    assert renewed.GetSegmentation().GetNumberOfSegments() == len(TINY_LABELS)
    again = result.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert np.array_equal(mask(renewed, again, ct), before)  # the same model on the same CT


def test_uncertainty_overlay_is_a_removable_node_that_leaves_the_input_alone(logic, ct, result, scene):
    views = addSliceViews(scene)
    node = logic.uncertaintyVolume(result)
    if node is None:
        assert "uncertainty" not in (logic.job.review or [{}])[0]
        pytest.skip("the engine's worker sends no uncertainty map yet (issue 15, engine half)")
    voxels, display = slicer.util.arrayFromVolume(ct).copy(), ct.GetDisplayNode()
    window = (display.GetWindow(), display.GetLevel()) if display else None
    ctMatrix, mapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(ctMatrix)
    node.GetIJKToRASMatrix(mapMatrix)
    assert all(ctMatrix.GetElement(r, c) == pytest.approx(mapMatrix.GetElement(r, c))
               for r in range(4) for c in range(4))
    assert slicer.util.arrayFromVolume(node).shape == voxels.shape
    assert slicer.util.arrayFromVolume(node).any()
    assert logic.showUncertainty(result) is node
    for _, composite in views.values():
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(review.UNCERTAINTY_OPACITY)
    assert node.GetDisplayNode().GetApplyThreshold()
    logic.showUncertainty(result, False)
    assert all(composite.GetForegroundVolumeID() is None for _, composite in views.values())
    logic.showUncertainty(result)
    logic.removeUncertainty(result)
    assert scene.GetNodeByID(node.GetID()) is None and logic.uncertaintyVolume(result) is None
    assert all(composite.GetForegroundVolumeID() is None for _, composite in views.values())
    assert np.array_equal(slicer.util.arrayFromVolume(ct), voxels)
    if display:
        assert (display.GetWindow(), display.GetLevel()) == window


def test_change_report_after_erasing_a_slab_and_adding_a_slice(logic, ct, result, scene, tmp_path):
    spacing = np.array(ct.GetSpacing())[::-1]
    voxelMl = np.prod(spacing) / 1000
    erased, grown = nonEmptySegments(result, ct)[:2]
    ai = {segmentId: mask(result, segmentId, ct).copy() for segmentId in (erased, grown)}
    # erase the upper half of the slices of one segment (a slab across the whole organ)
    slices = np.flatnonzero(ai[erased].any(axis=(1, 2)))
    cut = ai[erased].copy()
    cut[slices[len(slices) // 2]:] = False
    slicer.util.updateSegmentBinaryLabelmapFromArray(cut.astype(np.uint8), result, erased, ct)
    # draw a 6 x 6 island where the segment is not, one pixel clear of it, on one slice
    more = ai[grown].copy()
    k, j, i = emptyWindow(ai[grown], 8)
    more[k, j + 1:j + 7, i + 1:i + 7] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(more.astype(np.uint8), result, grown, ct)
    logic.setSegmentReviewed(result, erased)

    rows, table = logic.finishReview(result, str(tmp_path / "review.csv"))
    byId = {row["segmentId"]: row for row in rows}
    a, b = ai[erased], cut
    assert byId[erased]["dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert byId[erased]["removed_ml"] == pytest.approx((a.sum() - b.sum()) * voxelMl)
    assert byId[erased]["added_ml"] == 0.0 and byId[erased]["edited"] and byId[erased]["reviewed"]
    # the island's whole contour was drawn: its 20 boundary pixels
    assert byId[grown]["apl_mm"] == pytest.approx(20 * spacing[1:].mean())
    assert byId[grown]["added_ml"] == pytest.approx(36 * voxelMl)
    assert byId[grown]["removed_ml"] == 0.0
    for segmentId, row in byId.items():
        if segmentId not in (erased, grown):
            assert not row["edited"] and row["dice"] == 1.0 and row["apl_mm"] == 0.0
    # the table node and the CSV say the same
    assert table.GetNumberOfRows() == len(rows) and table.GetName() == f"{result.GetName()} review"
    assert table.GetCellText(0, 0) == rows[0]["segment"]
    with open(tmp_path / "review.csv", newline="", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [r["segment"] for r in written] == [row["segment"] for row in rows]
    erasedCsv = next(r for r in written if r["segment"] == byId[erased]["segment"])
    assert float(erasedCsv["dice"]) == pytest.approx(byId[erased]["dice"], abs=1e-4)
    assert (erasedCsv["edited"], erasedCsv["reviewed"]) == ("yes", "yes")
    # the edited segments will be exported as SEMIAUTOMATIC, the others stay AUTOMATIC
    segmentation = result.GetSegmentation()
    for segmentId, row in byId.items():
        expected = "SEMIAUTOMATIC" if row["edited"] else "AUTOMATIC"
        assert review._tag(segmentation.GetSegment(segmentId), "DICOM.SegmentAlgorithmType") == expected
    # an existing report is not overwritten without asking; a second report replaces the table node
    with pytest.raises(UNetSegError, match="exists"):
        logic.finishReview(result, str(tmp_path / "review.csv"))
    count = scene.GetNumberOfNodes()
    logic.finishReview(result, str(tmp_path / "review.csv"), overwrite=True)
    assert scene.GetNumberOfNodes() == count


def test_finish_review_needs_a_result_made_by_the_module(logic, ct, scene):
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual")
    manual.GetSegmentation().AddEmptySegment("", "Tumour", [1, 0, 0])
    count = scene.GetNumberOfNodes()
    with pytest.raises(UNetSegError, match="no kept AI original"):
        logic.finishReview(manual)
    assert scene.GetNumberOfNodes() == count


def test_change_report_lists_a_segment_added_and_one_deleted_by_the_reviewer(logic, ct, result):
    segmentation = result.GetSegmentation()
    gone = nonEmptySegments(result, ct)[0]
    goneName, goneVoxels = segmentation.GetSegment(gone).GetName(), mask(result, gone, ct).sum()
    segmentation.RemoveSegment(gone)
    added = segmentation.AddEmptySegment("", "Tumour", [1, 0, 0])
    island = np.zeros(slicer.util.arrayFromVolume(ct).shape, np.uint8)
    island[40:44, 100:110, 100:110] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(island, result, added, ct)
    rows, _ = logic.finishReview(result)
    byName = {row["segment"]: row for row in rows}
    voxelMl = np.prod(ct.GetSpacing()) / 1000
    assert byName["Tumour"]["status"] == "added" and byName["Tumour"]["dice"] == 0.0
    assert byName["Tumour"]["added_ml"] == pytest.approx(400 * voxelMl)
    assert byName[goneName]["status"] == "deleted" and byName[goneName]["edited"]
    assert byName[goneName]["removed_ml"] == pytest.approx(goneVoxels * voxelMl)
    # a segment the reviewer drew is not the model's: it gets no algorithm tags from us
    assert review._tag(segmentation.GetSegment(added), review.ALGORITHM_TYPE_TAG) is None
