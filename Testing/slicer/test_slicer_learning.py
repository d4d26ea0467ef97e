"""Learning from corrections through SlicerUNetSegLogic, on real MRML: the training-set export read
back, and a fine-tune in its own worker process (started through the launcher stand-in) that is
accepted, listed, restored and, when cancelled, installs nothing.

The export uses a real OpenKBP CT read by Slicer's volume reader and its clinical contours as the
segments, so the files can be compared with the original data voxel for voxel. The fine-tune uses a
tiny random network with the OpenKBP labels: the engine suite (``Testing/test_finetune.py``) judges
accuracy with the shipped model; here what matters is the Slicer side of the same path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from SlicerUNetSegLib.geometry import loadVolumeFile
from SlicerUNetSegLib.segmentationBuilder import fillSegmentation
from unetseg_engine.errors import CancelledError, UNetSegError

pytestmark = pytest.mark.slicer

OPENKBP_LABELS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                  "Mandible"]
REVIEWED = ["Brainstem", "RightParotid", "Mandible"]  # values 1, 3, 7


@pytest.fixture(scope="module")
def learningSetup(tmp_path_factory, modelsDir):
    """A tiny model with the OpenKBP labels on the search path, a fresh user folder, and a logic with
    a fine-tune worker of its own."""
    import os

    import torch

    from SlicerUNetSegLib.logic import SlicerUNetSegLogic
    from SlicerUNetSegLib.testing import TINY_LABELS
    from SlicerUNetSegLib.workerRunner import WorkerRunner
    from unetseg_engine.modelpkg import write_package
    from unetseg_engine.networks import build_network

    folder = tmp_path_factory.mktemp("hn-models")
    network = {"architecture": "UNet", "spatial_dims": 3,
               "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "instance"}}
    torch.manual_seed(0)
    core = build_network("UNet", 3, 1, len(OPENKBP_LABELS) + 1, network["params"])
    labels = [dict(TINY_LABELS[i % len(TINY_LABELS)], value=i + 1, name=name)
              for i, name in enumerate(OPENKBP_LABELS)]
    write_package(folder / "tiny-hn", {
        "schema_version": 1, "id": "tiny-hn", "version": "0.0.1", "title": "Tiny H&N test model",
        "description": "Random weights with the OpenKBP labels, for testing the path only.",
        "licence": "Apache-2.0", "modality": "CT", "inputs": [{"name": "CT"}], "network": network,
        "preprocessing": {"spacing_mm": [6.0, 6.0, 6.0],
                          "normalization": {"method": "ct_window", "level": 40.0, "width": 400.0}},
        "inference": {"patch_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 1},
        "output": {"type": "multiclass"}, "labels": labels,
        "training": {"validation_cases": ["pt_222", "pt_225"], "train_cases": []}}, core.state_dict())
    old = {k: os.environ.get(k) for k in ("UNETSEG_MODELS_PATH", "UNETSEG_USER_MODELS")}
    os.environ["UNETSEG_MODELS_PATH"] = os.pathsep.join([str(folder), old["UNETSEG_MODELS_PATH"] or ""])
    os.environ["UNETSEG_USER_MODELS"] = str(tmp_path_factory.mktemp("learning-user-models"))
    launcher = [sys.executable, str(Path(__file__).resolve().parent / "fakeLauncher.py")]
    logic = SlicerUNetSegLogic(runner=WorkerRunner(python=launcher),
                               finetuneRunner=WorkerRunner(python=launcher, cancelGraceS=20.0))
    yield logic
    logic.shutdown()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def reviewedCase(scene, openkbp):
    """pt_201 as Slicer loads it, its clinical contours as segments, three marked as reviewed."""
    ct = loadVolumeFile(openkbp[0], "pt_201 CT")
    contours = loadVolumeFile(openkbp[1], "pt_201 contours", labelmap=True)
    inSlicerOrder = slicer.util.arrayFromVolume(contours).copy()  # on the CT's IJK, as Slicer reads it
    scene.RemoveNode(contours)
    clinical = sitk.GetArrayFromImage(sitk.ReadImage(str(openkbp[1])))  # the file's own order
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "pt_201 reviewed")
    labels = [{"value": i + 1, "name": n, "color": [200, 100, 50]} for i, n in enumerate(OPENKBP_LABELS)]
    fillSegmentation(segmentation, ct, inSlicerOrder, labels)
    return ct, segmentation, clinical


def sceneState(scene):
    return sorted((scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetName())
                  for i in range(scene.GetNumberOfNodes()))


def test_add_to_training_set_writes_the_volume_and_only_the_reviewed_segments(
        learningSetup, reviewedCase, openkbp, scene, tmp_path):
    logic = learningSetup
    ct, segmentation, clinical = reviewedCase
    for name in REVIEWED:
        logic.setSegmentReviewed(segmentation,
                                 segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))
    assert [segmentation.GetSegmentation().GetSegment(i).GetName()
            for i in logic.reviewedSegmentIds(segmentation)] == REVIEWED
    before = sceneState(scene)
    voxels = slicer.util.arrayFromVolume(ct).copy()
    root = tmp_path / "training-set"
    record = logic.addToTrainingSet(ct, segmentation, modelId="tiny-hn", folder=str(root))
    assert record["case"] == "case_0001" and record["reviewed"] == [1, 3, 7]

    original = sitk.ReadImage(str(openkbp[0]))
    written = sitk.ReadImage(record["images"][0])
    label = sitk.ReadImage(record["label"])
    # the label map is on the written image's grid, and both cover the scan's voxels in patient space
    # (Slicer's reader may order the slices the other way: compare positions, not indices)
    assert label.GetSize() == written.GetSize() == original.GetSize()
    for attribute in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(label, attribute)(), getattr(written, attribute)(), atol=1e-6)
    assert np.allclose(written.GetSpacing(), original.GetSpacing(), atol=1e-5)
    corners = [(i, j, k) for i in (0, 127) for j in (0, 127) for k in (0, 127)]
    assert np.allclose(sorted(written.TransformIndexToPhysicalPoint(c) for c in corners),
                       sorted(original.TransformIndexToPhysicalPoint(c) for c in corners), atol=1e-3)

    def onOriginalGrid(image):
        return sitk.GetArrayFromImage(sitk.Resample(image, original, sitk.Transform(),
                                                    sitk.sitkNearestNeighbor, 0, image.GetPixelID()))

    assert np.array_equal(onOriginalGrid(written), sitk.GetArrayFromImage(original))
    expected = np.where(np.isin(clinical, [1, 3, 7]), clinical, 0)
    assert np.array_equal(onOriginalGrid(label), expected)
    assert label.GetPixelID() == sitk.sitkUInt8
    assert json.loads((root / "partial_labels.json").read_text()) == {"case_0001": [1, 3, 7]}
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"]["Mandible"] == 7 and meta["channel_names"] == {"0": "CT"}

    second = logic.addToTrainingSet(ct, segmentation, ["SpinalCord"], modelId="tiny-hn", folder=str(root))
    assert second["case"] == "case_0002" and second["reviewed"] == [2]
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(UNetSegError, match="already has a case 'case_0001'"):
        logic.addToTrainingSet(ct, segmentation, modelId="tiny-hn", folder=str(root), caseId="case_0001")
    with pytest.raises(UNetSegError, match="not one of the labels"):
        segmentation.GetSegmentation().AddEmptySegment("", "Tumour")
        logic.addToTrainingSet(ct, segmentation, ["Tumour"], modelId="tiny-hn", folder=str(root))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
    assert np.array_equal(slicer.util.arrayFromVolume(ct), voxels), "the volume was changed"
    assert sceneState(scene) == before, "the export left nodes in the scene"


def test_finetune_in_the_worker_is_accepted_listed_restored_and_a_cancel_installs_nothing(
        learningSetup, reviewedCase, tmp_path):
    from SlicerUNetSegLib.testing import dataRoot

    logic = learningSetup
    ct, segmentation, _ = reviewedCase
    root = tmp_path / "training-set"
    logic.addToTrainingSet(ct, segmentation, REVIEWED, modelId="tiny-hn", folder=str(root))
    logic.addToTrainingSet(ct, segmentation, ["SpinalCord", "Larynx"], modelId="tiny-hn", folder=str(root))
    openkbpRoot = str(dataRoot() / "openkbp_hn_oar")
    settings = {"iterations": 2, "learning_rate": 1e-6, "batch_size": 1, "patch_size": [48, 48, 32],
                "device": "cpu", "num_threads": 1, "precision": "fp32"}
    stages = []
    with pytest.raises(UNetSegError, match="too few to hold out"):  # two cases, no validation set
        logic.finetune("tiny-hn", str(root), settings=settings, timeoutS=120)
    result = logic.finetune("tiny-hn", str(root), openkbpRoot, settings,
                            onProgress=lambda stage, f: stages.append(stage), timeoutS=300)
    assert result["accepted"], result["summary"]
    gate = result["gate"]
    assert gate["held_out"] == "model validation" and gate["cases"] == ["pt_222", "pt_225"]
    assert abs(gate["new_mean_dice"] - gate["old_mean_dice"]) <= gate["mean_tolerance"]
    assert "fine-tuning" in stages and "installing" in stages
    assert [(v["version"], v["active"]) for v in logic.listModelVersions("tiny-hn")] == \
        [("0.0.1", False), ("0.0.2", True)]
    assert logic.getModel("tiny-hn").meta["version"] == "0.0.2"
    assert logic.restoreModelVersion("tiny-hn") == "0.0.1"
    assert logic.getModel("tiny-hn").meta["version"] == "0.0.1"

    job = logic.startFinetune("tiny-hn", str(root), openkbpRoot, dict(settings, iterations=5000))
    deadline = time.monotonic() + 120
    while logic.pollFinetune() and job.stage != "fine-tuning" and time.monotonic() < deadline:
        time.sleep(0.05)
    logic.cancelFinetune()
    while logic.pollFinetune() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == "cancelled", (job.state, job.error)
    assert [(v["version"], v["active"]) for v in logic.listModelVersions("tiny-hn")] == \
        [("0.0.1", True), ("0.0.2", False)]
    with pytest.raises(CancelledError):
        logic.finetune("tiny-hn", str(root), openkbpRoot, dict(settings, iterations=5000), timeoutS=0.5)


@pytest.mark.widget
def test_panel_section_marks_reviewed_segments_adds_the_case_and_shows_versions(
        learningSetup, reviewedCase, monkeypatch, tmp_path):
    import os

    import qt

    import SlicerUNetSeg
    from SlicerUNetSegLib.learningPanel import resultHtml

    monkeypatch.setattr(learningSetup, "trainingSetFolder", lambda modelId: tmp_path / "set" / modelId)
    ct, segmentation, clinical = reviewedCase
    parent = slicer.qMRMLWidget()
    parent.setLayout(qt.QVBoxLayout())
    parent.setMRMLScene(slicer.mrmlScene)
    widget = SlicerUNetSeg.SlicerUNetSegWidget(parent)
    widget.setup()
    widget.logic.shutdown()
    widget.logic = learningSetup
    widget.errors = []
    widget.showError = lambda text, details=None: widget.errors.append(text)
    try:
        node = widget._parameterNode
        node.modelId, node.inputVolume, node.outputSegmentation = "tiny-hn", ct, segmentation
        section = widget.learningPanel
        section.refresh()
        items = [section.reviewedList.item(i) for i in range(section.reviewedList.count())]
        assert [item.text() for item in items] == OPENKBP_LABELS
        assert section.addButton.isEnabled()
        section.addButton.click()  # nothing reviewed yet: refused, saying what to do
        assert widget.errors and "No segment is marked as reviewed" in widget.errors[-1]
        for item in items:
            if item.text() in ("Brainstem", "Mandible"):
                item.setCheckState(qt.Qt.Checked)
        assert [segmentation.GetSegmentation().GetSegment(i).GetName()
                for i in learningSetup.reviewedSegmentIds(segmentation)] == ["Brainstem", "Mandible"]
        section.addButton.click()
        case = tmp_path / "set" / "tiny-hn" / "labelsTr" / "case_0001.nii.gz"
        assert case.is_file()
        assert sorted(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(case))))) == [0, 1, 7]
        assert section.trainingSetLabel.property("text").startswith("1 case(s) in ")
        assert "0.0.1 (base" in section.versionsLabel.property("text")
        gate = {"held_out": "user", "cases": ["a", "b"], "reasons": ["Mean Dice fell from 0.700 to 0.500."],
                "old_mean_dice": 0.7, "new_mean_dice": 0.5,
                "per_label": {"Brainstem": {"n": 2, "old": 0.7, "new": 0.5, "delta": -0.2},
                              "Larynx": {"n": 0, "old": None, "new": None, "delta": None}}}
        text = resultHtml({"accepted": False, "old_version": "1.2.0", "new_version": "1.2.1", "gate": gate})
        assert "<b>Rejected</b>: version 1.2.0 stays" in text and "-0.200" in text and "Larynx" not in text
        section.resultLabel.setText(text)
        folder = os.environ.get("UNETSEG_SCREENSHOT_DIR")
        if folder:
            parent.resize(440, 1200)
            parent.show()
            slicer.app.processEvents()
            parent.grab().save(str(Path(folder) / "learn-from-corrections.png"))
    finally:
        widget.learningPanel.cleanup()  # not widget.cleanup(): it would stop the shared logic's workers
        widget.timer.stop()
        widget.removeObservers()
        parent.close()
