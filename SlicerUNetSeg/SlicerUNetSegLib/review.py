"""Reviewing what the AI drew: the review table's data, jump-to-region, the uncertainty overlay, and
the change report ("what changed") when the review is finished. Scriptable without the panel::

    logic = slicer.util.getModuleLogic("SlicerUNetSeg")
    segmentation = logic.process(ct, uncertainty=True)
    for row in logic.reviewRows(segmentation):          # name, volume, confidence, flags, reviewed
        print(row["name"], row["confidence"], [f["code"] for f in row["flags"]])
    logic.jumpToSegment(segmentation, row["segmentId"])  # slice views to its least certain region
    logic.showUncertainty(segmentation)                  # coloured overlay (a volume node)
    ...edit in Segment Editor...
    rows, table = logic.finishReview(segmentation, "/path/review.csv")

Where things are kept (all saved with the scene):

- The engine's review (per label: volume, confidence, flags, the RAS point to look at first) is a JSON
  attribute of the result node (``REVIEW_ATTRIBUTE``), keyed by segment ID.
- The AI's original segments are a separate, hidden segmentation node, referenced from the result
  (role ``ORIGINAL_ROLE``), with the same segment IDs. A separate node rather than hidden segments
  in the result: Segment Editor, exports and DICOM SEG never see them, and nothing can paint on them.
- Each result segment carries the tags Slicer's DICOM SEG exporter reads (``DICOM.SegmentAlgorithmType``:
  AUTOMATIC, then SEMIAUTOMATIC once finishing the review finds it edited; ``DICOM.SegmentAlgorithmName``:
  the model id; without them Slicer writes MANUAL) and ``SlicerUNetSeg.Reviewed`` (the check box).
- The uncertainty map, when requested, is a scalar volume node on the input's grid (role
  ``UNCERTAINTY_ROLE``); showing it sets it as the slice views' foreground, the input is untouched.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from unetseg_engine.errors import UNetSegError

from .segmentationBuilder import placeLikeVolume

REVIEW_ATTRIBUTE = "SlicerUNetSeg.Review"
ORIGINAL_OF_ATTRIBUTE = "SlicerUNetSeg.AIOriginalOf"
ORIGINAL_ROLE = "unetsegAIOriginal"
UNCERTAINTY_ROLE = "unetsegUncertainty"
REVIEWED_TAG = "SlicerUNetSeg.Reviewed"  # "1" once reviewed; learning.py's Add to training set reads it
ORIGINAL_TAG = "SlicerUNetSeg.AIOriginal"
ALGORITHM_TYPE_TAG = "DICOM.SegmentAlgorithmType"  # what Slicer's DICOMSegmentationPlugin reads
ALGORITHM_NAME_TAG = "DICOM.SegmentAlgorithmName"
UNCERTAINTY_COLOR_NODE = "vtkMRMLPETProceduralColorNodePET-Heat"  # made by vtkMRMLColorLogic
UNCERTAINTY_OPACITY = 0.5
REPORT_COLUMNS = (  # (key, column title, unit)
    ("segment", "Segment", ""), ("reviewed", "Reviewed", ""), ("edited", "Edited", ""),
    ("dice", "Dice", ""), ("hd95_mm", "HD95", "mm"), ("surface_dice", "Surface Dice", ""),
    ("apl_mm", "Added path length", "mm"), ("added_ml", "Added volume", "ml"),
    ("removed_ml", "Removed volume", "ml"), ("volume_original_ml", "AI volume", "ml"),
    ("volume_corrected_ml", "Corrected volume", "ml"))


def _tag(segment, name: str) -> str | None:
    value = vtk.reference("")  # vtk.mutable in Slicer's own code: the same class
    return str(value) if segment.GetTag(name, value) else None


def removeNodeAndItsParts(node) -> None:
    """Remove a node with its display and storage nodes (the scene's RemoveNode leaves those)."""
    scene = node.GetScene()
    if scene is None:
        return
    parts = []
    for getCount, getNth in (("GetNumberOfDisplayNodes", "GetNthDisplayNode"),
                             ("GetNumberOfStorageNodes", "GetNthStorageNode")):
        if hasattr(node, getCount):
            parts += [getattr(node, getNth)(i) for i in range(getattr(node, getCount)())]
    scene.RemoveNode(node)
    for part in parts:
        if part is not None and part.GetScene() is scene:
            scene.RemoveNode(part)


def referenceVolume(segmentationNode):
    """The input volume the segmentation was made on (its reference geometry node)."""
    return segmentationNode.GetNodeReference(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


class ReviewLogicMixin:
    """The review part of ``SlicerUNetSegLogic`` (kept apart from running models)."""

    # ---- after Segment ----------------------------------------------------------------------------
    @staticmethod
    def keepReviewData(node, volume, segmentIds: list[str], labels: list[dict[str, Any]],
                       modelId: str, event: dict[str, Any]) -> list:
        """Store the engine's review on the result, tag its segments, keep the AI's original segments
        and load the uncertainty map. Called once the segments are built; returns the nodes it added
        (the caller removes them if anything later fails)."""
        ReviewLogicMixin.removeReviewNodes(node)
        segmentation = node.GetSegmentation()
        byValue = {int(label["value"]): segmentId for label, segmentId in zip(labels, segmentIds)}
        review = {}
        for entry in event.get("review") or []:
            segmentId = byValue.get(int(entry.get("value", -1)))
            if segmentId is not None:
                review[segmentId] = {key: entry.get(key) for key in
                                     ("name", "volume_ml", "confidence", "flags", "focus_ras")}
        node.SetAttribute(REVIEW_ATTRIBUTE, json.dumps(review))
        for segmentId in segmentIds:
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(ALGORITHM_TYPE_TAG, "AUTOMATIC")
            segment.SetTag(ALGORITHM_NAME_TAG, modelId[:64])
            segment.SetTag(REVIEWED_TAG, "0")
        added: list = []
        try:
            ReviewLogicMixin._keepOriginal(node, volume, added)
            if event.get("uncertainty"):
                uncertainty = ReviewLogicMixin._loadUncertainty(event["uncertainty"], volume,
                                                                f"{node.GetName()} uncertainty", added)
                node.SetNodeReferenceID(UNCERTAINTY_ROLE, uncertainty.GetID())
        except BaseException:
            for extra in added:
                removeNodeAndItsParts(extra)
            raise
        return added

    @staticmethod
    def _keepOriginal(node, volume, added: list) -> None:
        """A hidden copy of the AI's segments (same segment IDs), referenced from ``node``."""
        scene = node.GetScene()
        segmentation = node.GetSegmentation()
        original = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{node.GetName()} (AI original)")
        added.append(original)
        original.SetAndObserveTransformNodeID(node.GetTransformNodeID())
        original.GetSegmentation().DeepCopy(segmentation)  # keeps the segment IDs
        original.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        for index in range(original.GetSegmentation().GetNumberOfSegments()):
            original.GetSegmentation().GetNthSegment(index).SetTag(ORIGINAL_TAG, "1")
        original.CreateDefaultDisplayNodes()
        original.GetDisplayNode().SetVisibility(False)
        original.SetHideFromEditors(True)  # not offered in node selectors or Segment Editor
        original.SetAttribute(ORIGINAL_OF_ATTRIBUTE, node.GetID())
        node.SetNodeReferenceID(ORIGINAL_ROLE, original.GetID())

    @staticmethod
    def _loadUncertainty(path: str, volume, name: str, added: list):
        """The engine's map (on the input's grid) as a scalar volume with the input's geometry."""
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if array.shape != slicer.util.arrayFromVolume(volume).shape:
            raise UNetSegError(f"The uncertainty map came back with shape {array.shape}, not the input's "
                               f"{slicer.util.arrayFromVolume(volume).shape}; please report this.")
        if array.dtype == np.float16:  # VTK has no half floats
            array = array.astype(np.float32)
        node = volume.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        added.append(node)
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        node.SetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(node, array)
        placeLikeVolume(node, volume)  # same transform, same study
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        top = 255.0 if array.dtype == np.uint8 else 1.0
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, top)
        display.SetAutoThreshold(False)
        display.SetThreshold(top / 255.0, top)  # zero (no organ plausible) stays transparent
        display.SetApplyThreshold(True)
        if volume.GetScene().GetNodeByID(UNCERTAINTY_COLOR_NODE) is not None:
            display.SetAndObserveColorNodeID(UNCERTAINTY_COLOR_NODE)
        return node

    @staticmethod
    def removeReviewNodes(node) -> None:
        """Remove the kept original and the uncertainty map of a result (before it is replaced)."""
        for role in (ORIGINAL_ROLE, UNCERTAINTY_ROLE):
            old = node.GetNodeReference(role)
            if old is not None:
                node.SetNodeReferenceID(role, None)
                removeNodeAndItsParts(old)

    # ---- the review table ---------------------------------------------------------------------------
    @staticmethod
    def originalSegmentation(segmentationNode):
        return segmentationNode.GetNodeReference(ORIGINAL_ROLE) if segmentationNode else None

    @staticmethod
    def reviewRows(segmentationNode) -> list[dict[str, Any]]:
        """One row per segment, in segment order: ``segmentId``, ``name``, ``volumeMl`` (now, after any
        edits), ``confidence`` (None when the engine gave none), ``flags`` ([{code, message}]),
        ``focusRas`` (the engine's point, local coordinates, or None) and ``reviewed``."""
        review = json.loads(segmentationNode.GetAttribute(REVIEW_ATTRIBUTE) or "{}")
        segmentation = segmentationNode.GetSegmentation()
        volume = referenceVolume(segmentationNode)
        voxelMl = float(np.prod(volume.GetSpacing())) / 1000.0 if volume is not None else None
        rows = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segmentId)
            entry = review.get(segmentId, {})
            rows.append({
                "segmentId": segmentId, "name": segment.GetName(),
                "volumeMl": _segmentVoxels(segmentationNode, segmentId) * voxelMl if voxelMl else None,
                "confidence": entry.get("confidence"), "flags": list(entry.get("flags") or []),
                "focusRas": entry.get("focus_ras"), "reviewed": _tag(segment, REVIEWED_TAG) == "1"})
        return rows

    @staticmethod
    def setSegmentReviewed(segmentationNode, segmentId: str, reviewed: bool = True) -> None:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise UNetSegError(f"No segment '{segmentId}' in '{segmentationNode.GetName()}'.")
        segment.SetTag(REVIEWED_TAG, "1" if reviewed else "0")

    @staticmethod
    def focusPoint(segmentationNode, segmentId: str) -> list[float] | None:
        """Where to look first, in world RAS: the engine's least certain point, else the segment's voxel
        nearest its centroid (on the segment even when it is curved, as a mandible); None if empty."""
        review = json.loads(segmentationNode.GetAttribute(REVIEW_ATTRIBUTE) or "{}")
        local = (review.get(segmentId) or {}).get("focus_ras")
        if local is None:
            local = _segmentCentreRas(segmentationNode, segmentId)
        if local is None:
            return None
        world = [float(v) for v in local]
        transform = segmentationNode.GetParentTransformNode()
        if transform is not None:  # the engine works in the volume's own frame
            toWorld = vtk.vtkGeneralTransform()
            transform.GetTransformToWorld(toWorld)
            world = list(toWorld.TransformPoint(world))
        return world

    @staticmethod
    def jumpToSegment(segmentationNode, segmentId: str) -> list[float] | None:
        """Centre every slice view on ``focusPoint``; returns the point (world RAS) or None."""
        point = ReviewLogicMixin.focusPoint(segmentationNode, segmentId)
        if point is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(segmentationNode.GetScene(), *point,
                                                  slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return point

    @staticmethod
    def uncertaintyVolume(segmentationNode):
        return segmentationNode.GetNodeReference(UNCERTAINTY_ROLE) if segmentationNode else None

    @staticmethod
    def showUncertainty(segmentationNode, show: bool = True):
        """Overlay the uncertainty map in every slice view (foreground layer, half opaque), or take it
        off; returns its node (None when the run made no map). The input volume is not touched."""
        node = ReviewLogicMixin.uncertaintyVolume(segmentationNode)
        scene = segmentationNode.GetScene()
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
            if show and node is not None:
                composite.SetForegroundVolumeID(node.GetID())
                composite.SetForegroundOpacity(UNCERTAINTY_OPACITY)
            elif node is not None and composite.GetForegroundVolumeID() == node.GetID():
                composite.SetForegroundVolumeID(None)
        return node

    @staticmethod
    def removeUncertainty(segmentationNode) -> None:
        """Take the overlay off and remove the map's node from the scene."""
        node = ReviewLogicMixin.uncertaintyVolume(segmentationNode)
        if node is not None:
            ReviewLogicMixin.showUncertainty(segmentationNode, False)
            segmentationNode.SetNodeReferenceID(UNCERTAINTY_ROLE, None)
            removeNodeAndItsParts(node)

    # ---- what changed -------------------------------------------------------------------------------
    @staticmethod
    def changeReport(segmentationNode, toleranceMm: float = 2.0) -> list[dict[str, Any]]:
        """Per segment, the AI's original against the segment now: Dice, HD95 (mm), surface Dice at
        ``toleranceMm``, added path length (mm), added and removed volume (ml), and whether it was
        edited. Segments are matched by ID (kept when the user renames one); a segment the user added
        is compared with nothing, one the user deleted with an empty mask."""
        from unetseg_engine.metrics import edit_metrics

        original = ReviewLogicMixin.originalSegmentation(segmentationNode)
        if original is None:
            raise UNetSegError(f"'{segmentationNode.GetName()}' has no kept AI original to compare with: "
                               "only a segmentation made by Segment in this module can be reviewed.")
        volume = referenceVolume(segmentationNode)
        if volume is None:
            raise UNetSegError(f"'{segmentationNode.GetName()}' has lost its input volume (reference "
                               "geometry); the change report needs its grid.")
        spacing = tuple(float(s) for s in volume.GetSpacing())[::-1]
        now, before = segmentationNode.GetSegmentation(), original.GetSegmentation()
        ids = [now.GetNthSegmentID(i) for i in range(now.GetNumberOfSegments())]
        ids += [before.GetNthSegmentID(i) for i in range(before.GetNumberOfSegments())
                if before.GetNthSegmentID(i) not in ids]
        empty = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
        rows = []
        for segmentId in ids:
            segment, kept = now.GetSegment(segmentId), before.GetSegment(segmentId)
            corrected = _maskOnVolume(segmentationNode, segmentId, volume) if segment else empty
            ai = _maskOnVolume(original, segmentId, volume) if kept else empty
            row = {"segmentId": segmentId, "segment": (segment or kept).GetName(),
                   "reviewed": bool(segment) and _tag(segment, REVIEWED_TAG) == "1",
                   "edited": not np.array_equal(ai, corrected),
                   "status": "deleted" if segment is None else "added" if kept is None else "",
                   **edit_metrics(ai, corrected, spacing, toleranceMm)}
            rows.append(row)
        return rows

    @staticmethod
    def finishReview(segmentationNode, csvPath: str | None = None, toleranceMm: float = 2.0,
                     overwrite: bool = False):
        """Report what changed (``changeReport``) as a table node and, with ``csvPath``, a CSV (written
        atomically; an existing file is kept unless ``overwrite``), and tag each edited segment
        SEMIAUTOMATIC for DICOM SEG export. Returns (rows, table node)."""
        from unetseg_engine.outputs import atomic_write

        if csvPath is not None and Path(csvPath).exists() and not overwrite:
            raise UNetSegError(f"'{csvPath}' exists; choose another file or allow overwriting it.")
        rows = ReviewLogicMixin.changeReport(segmentationNode, toleranceMm)
        table = _reportTable(segmentationNode, rows, toleranceMm)
        try:
            if csvPath is not None:
                def write(tmp: str) -> None:
                    with open(tmp, "w", newline="", encoding="utf-8") as f:
                        writer = csv.writer(f)
                        writer.writerow([key for key, _, _ in REPORT_COLUMNS] + ["status"])
                        for row in rows:
                            writer.writerow([_csvValue(row[key]) for key, _, _ in REPORT_COLUMNS]
                                            + [row["status"]])

                atomic_write(Path(csvPath), write)
        except BaseException:
            removeNodeAndItsParts(table)
            raise
        segmentation = segmentationNode.GetSegmentation()
        for row in rows:
            segment = segmentation.GetSegment(row["segmentId"])
            if segment is not None and row["edited"] and row["status"] != "added":
                segment.SetTag(ALGORITHM_TYPE_TAG, "SEMIAUTOMATIC")  # the model's, corrected by a person
        return rows, table


def _csvValue(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def _reportTable(segmentationNode, rows, toleranceMm: float):
    """A table node of the change report, one row per segment (replaces an earlier report's node)."""
    scene = segmentationNode.GetScene()
    name = f"{segmentationNode.GetName()} review"
    old = scene.GetFirstNodeByName(name)
    if old is not None and old.IsA("vtkMRMLTableNode"):
        removeNodeAndItsParts(old)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    data = vtk.vtkTable()
    for key, title, _ in REPORT_COLUMNS:
        column = vtk.vtkStringArray() if key in ("segment", "reviewed", "edited") else vtk.vtkDoubleArray()
        column.SetName(title if key != "surface_dice" else f"Surface Dice {toleranceMm:g} mm")
        for row in rows:
            value = row[key]
            if isinstance(column, vtk.vtkStringArray):
                column.InsertNextValue(_csvValue(value))
            else:
                column.InsertNextValue(float(value))
        data.AddColumn(column)
    table.SetAndObserveTable(data)
    for key, title, unit in REPORT_COLUMNS:
        if unit:
            table.SetColumnUnitLabel(title, unit)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetAttribute("SlicerUNetSeg.ReviewOf", segmentationNode.GetID())
    return table


def _maskOnVolume(segmentationNode, segmentId: str, volume) -> np.ndarray:
    """A segment as a bool (k, j, i) array on the volume's grid, through Slicer's own export (as
    ``slicer.util.arrayFromSegmentBinaryLabelmap``, which leaves the temporary display node behind)."""
    scene = segmentationNode.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    colorsBefore = _nodeIds(scene, "vtkMRMLColorNode")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__unetseg_temp__")
    try:
        # the volume's whole grid (the default extent would crop to the segment, or be empty)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        voxels = slicer.util.arrayFromVolume(labelmap) if exported else None
        if voxels is None or voxels.shape != slicer.util.arrayFromVolume(volume).shape:
            raise UNetSegError(f"Could not export segment '{segmentId}' of '{segmentationNode.GetName()}' "
                               "onto the input volume's grid.")
        return voxels > 0
    finally:
        removeNodeAndItsParts(labelmap)
        for colorId in _nodeIds(scene, "vtkMRMLColorNode") - colorsBefore:  # the export's colour table
            scene.RemoveNode(scene.GetNodeByID(colorId))


def _nodeIds(scene, className: str) -> set[str]:
    return {scene.GetNthNodeByClass(i, className).GetID()
            for i in range(scene.GetNumberOfNodesByClass(className))}


def _segmentVoxels(segmentationNode, segmentId: str) -> int:
    """Voxels in a segment's binary labelmap (its own layer may be shared with other segments)."""
    from vtk.util import numpy_support

    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None or image.GetPointData().GetScalars() is None:
        return 0
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return int(np.count_nonzero(voxels == segment.GetLabelValue()))


def _segmentCentreRas(segmentationNode, segmentId: str) -> list[float] | None:
    """The segment's voxel nearest its centroid, in the segmentation's local RAS."""
    from vtk.util import numpy_support

    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None or image.GetPointData().GetScalars() is None:
        return None
    extent = image.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape) <= 0:
        return None
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)
    kji = np.argwhere(voxels == segment.GetLabelValue())
    if not len(kji):
        return None
    nearest = kji[np.argmin(((kji - kji.mean(axis=0)) ** 2).sum(axis=1))]
    ijk = [nearest[2] + extent[0], nearest[1] + extent[2], nearest[0] + extent[4]]
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return list(matrix.MultiplyPoint([float(v) for v in ijk] + [1.0])[:3])
