"""SlicerUNetSegLogic on the real MRML of slicer-core, with the real engine in its worker process.

The scan is a synthetic CT (oblique, a flipped axis, anisotropic voxels) read from a file by Slicer's
own volume reader, so these run without the shared data. The tiny model has random weights: it checks
the path and the geometry, not accuracy; accuracy against the clinical contours of a real OpenKBP CT
uses the default model and the shared data.
"""

from __future__ import annotations

import os
import signal
import time
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

import harness
from helpers import golden_differences
from SlicerUNetSegLib.geometry import ijkToRasArray, loadVolumeFile, lpsGeometry
from SlicerUNetSegLib.segmentationBuilder import segmentationSnapshot, terminologyEntryString
from SlicerUNetSegLib.testing import TINY_LABELS, TINY_MODEL_ID
from unetseg_engine.errors import CancelledError, UNetSegError

pytestmark = pytest.mark.slicer


@pytest.fixture
def ct(scene, syntheticCtFile):
    return loadVolumeFile(syntheticCtFile, "Synthetic CT")


@pytest.fixture
def realCt(scene, openkbp):
    return loadVolumeFile(openkbp[0], "pt_201 CT")


def sceneState(scene):
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return sorted((n.GetID(), n.GetName()) for n in nodes)


def exportLabels(segmentation, volume):
    """Segments back to one label map on the volume's grid, values in segment order (1, 2, ...)."""
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(
        segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert np.allclose(ijkToRasArray(labelmap), ijkToRasArray(volume), atol=1e-4)
    array = slicer.util.arrayFromVolume(labelmap).copy()
    slicer.mrmlScene.RemoveNode(labelmap)
    return array


def segmentNames(segmentation):
    s = segmentation.GetSegmentation()
    return [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]


def test_segments_carry_model_names_colours_terminology(logic, ct):
    before = slicer.util.arrayFromVolume(ct).copy()
    segmentation = logic.process(ct, None, TINY_MODEL_ID, device="cpu")
    assert segmentNames(segmentation) == [label["name"] for label in TINY_LABELS]
    s = segmentation.GetSegmentation()
    for index, label in enumerate(TINY_LABELS):
        segment = s.GetNthSegment(index)
        assert np.allclose(segment.GetColor(), [c / 255 for c in label["color"]], atol=1e-6)
        assert segment.GetTerminology() == terminologyEntryString(label)
        assert f"SCT^{label['terminology']['type']['code']}^" in segment.GetTerminology()
    assert "SCT^24028007^Right" in s.GetNthSegment(1).GetTerminology()  # the laterality modifier
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is ct
    assert np.array_equal(slicer.util.arrayFromVolume(ct), before), "the input volume was changed"
    assert exportLabels(segmentation, ct).any()


def test_labels_land_on_the_same_voxels_as_the_engine_on_a_rotated_volume(logic, ct, modelsDir,
                                                                          syntheticCtFile):
    """A volume with an oblique IJK-to-RAS: the module's segments must equal, in physical space, what
    the engine computes from the file read by SimpleITK and rotated the same way."""
    from unetseg_engine.inference import Predictor

    angle = np.deg2rad(20)
    rotationRas = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = ijkToRasArray(ct)
    matrix[:3, :] = rotationRas @ matrix[:3, :]
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, matrix[r, c])
    ct.SetIJKToRASMatrix(m)
    segmentation = logic.process(ct, None, TINY_MODEL_ID, device="cpu")
    module = exportLabels(segmentation, ct)

    image = sitk.ReadImage(str(syntheticCtFile))  # independent reader, independent index order
    flip = np.diag([-1.0, -1.0, 1.0])
    rotationLps = flip @ rotationRas @ flip
    image.SetDirection((rotationLps @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    image.SetOrigin((rotationLps @ np.array(image.GetOrigin())).tolist())
    engine = Predictor(device="cpu")
    engine.load(str(modelsDir / TINY_MODEL_ID))
    expected = engine.predict([image]).label_map

    spacing, origin, direction = lpsGeometry(ct)
    moduleImage = sitk.GetImageFromArray(module)
    moduleImage.SetSpacing(spacing), moduleImage.SetOrigin(origin), moduleImage.SetDirection(direction)
    onEngineGrid = sitk.GetArrayFromImage(sitk.Resample(moduleImage, expected, sitk.Transform(),
                                                        sitk.sitkNearestNeighbor, 0))
    expectedArray = sitk.GetArrayFromImage(expected)
    assert expectedArray.any()
    agreement = np.mean(onEngineGrid == expectedArray)
    assert agreement > 0.999, f"only {agreement:.4%} of voxels agree"


def test_dice_against_clinical_contours_with_the_default_model(logic, realCt, defaultModel, openkbp):
    from unetseg_engine.modelpkg import load_package

    package = load_package(defaultModel)
    truth = loadVolumeFile(openkbp[1], "pt_201 contours", labelmap=True)
    segmentation = logic.process(realCt, None, package.id, device="cpu")
    predicted = exportLabels(segmentation, realCt)  # segment i+1 = model label i
    reference = slicer.util.arrayFromVolume(truth)
    dice = {}
    for index, label in enumerate(package.labels):
        p, t = predicted == index + 1, reference == label["value"]
        dice[label["name"]] = 2 * np.logical_and(p, t).sum() / max(1, p.sum() + t.sum())
    print("Dice on pt_201 through the module:", {k: round(v, 3) for k, v in dice.items()})
    assert np.mean(list(dice.values())) > 0.5, dice
    for name in ("Brainstem", "Mandible", "RightParotid", "LeftParotid"):
        assert dice[name] > 0.4, (name, dice)
    # and voxel for voxel where the engine puts them: a one-slice shift passes the Dice floors above
    module = sitk.GetImageFromArray(predicted)
    spacing, origin, direction = lpsGeometry(realCt)  # Slicer's reader may reverse k: its own grid
    module.SetSpacing(spacing), module.SetOrigin(origin), module.SetDirection(direction)
    assert golden_differences(module, "pt_201") == []


def test_second_run_is_warm(logic, ct):
    logic.process(ct, None, TINY_MODEL_ID, device="cpu")
    second = logic.process(ct, None, TINY_MODEL_ID, device="cpu")
    assert second is not None and logic.job.warm
    assert logic.job.timings["load_model_s"] < 0.5
    print("warm run timings:", {k: round(v, 3) for k, v in logic.job.timings.items()})


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_goes_to_the_worker_and_the_job_says_which_ran(logic, ct, runtime):
    import importlib.util

    ran = runtime if importlib.util.find_spec(runtime) else "torch"  # missing: PyTorch, with a note
    logic.process(ct, None, TINY_MODEL_ID, device="cpu", runtime=runtime)
    assert logic.job.runtime == ran
    assert bool(logic.job.messages) == (ran == "torch")
    with pytest.raises(UNetSegError, match="Unknown runtime"):
        logic.process(ct, None, TINY_MODEL_ID, device="cpu", runtime="tensorrt")


def test_cancel_stops_within_a_second_and_leaves_the_scene(logic, ct, scene):
    state = sceneState(scene)
    cancelledAt = []

    def progress(stage, fraction):
        if stage == "inference" and fraction > 0 and not cancelledAt:
            cancelledAt.append(time.perf_counter())
            logic.cancel()

    with pytest.raises(CancelledError):
        logic.process(ct, None, TINY_MODEL_ID, device="cpu", overlap=0.9, onProgress=progress)
    latency = time.perf_counter() - cancelledAt[0]
    assert latency < 1.5, f"cancel took {latency:.2f} s"
    assert sceneState(scene) == state
    assert not os.path.exists(logic.job.tempDir)
    assert logic.process(ct, None, TINY_MODEL_ID, device="cpu") is not None  # usable afterwards


def test_existing_segmentation_is_replaced_only_when_allowed(logic, ct, scene):
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual contours")
    existing.GetSegmentation().AddEmptySegment("", "My tumour", [1, 0, 0])
    snapshot = segmentationSnapshot(existing)
    with pytest.raises(UNetSegError, match="already has 1 segments"):
        logic.process(ct, existing, TINY_MODEL_ID, device="cpu")
    assert segmentationSnapshot(existing) == snapshot
    result = logic.process(ct, existing, TINY_MODEL_ID, device="cpu", replaceExisting=True)
    assert result is existing
    assert segmentNames(existing) == [label["name"] for label in TINY_LABELS]


def test_errors_leave_the_scene_unchanged(logic, ct, scene):
    flat = slicer.util.addVolumeFromArray(np.zeros((8, 16, 16), np.int16), name="flat")
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty output")
    state = sceneState(scene)
    with pytest.raises(UNetSegError, match="every voxel has the value"):  # found by the worker
        logic.process(flat, existing, TINY_MODEL_ID, device="cpu")
    with pytest.raises(UNetSegError, match="Unknown model"):
        logic.process(ct, None, "no-such-model")
    with pytest.raises(UNetSegError, match="needs 1 input volume"):
        logic.process([ct, ct], None, TINY_MODEL_ID)
    with pytest.raises(UNetSegError, match="No input volume"):
        logic.process(None, None, TINY_MODEL_ID)
    warp = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    state = sceneState(scene)
    ct.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(UNetSegError, match="Harden the transform"):
        logic.process(ct, None, TINY_MODEL_ID)
    ct.SetAndObserveTransformNodeID(None)
    assert sceneState(scene) == state
    assert existing.GetSegmentation().GetNumberOfSegments() == 0


def test_worker_crash_is_reported_and_slicer_survives(logic, ct, scene):
    """The kernel's out-of-memory killer picks the engine's process, the launcher's child; the
    launcher then exits with 1 after saying so, and that is what the runner sees."""
    state = sceneState(scene)
    killed = []

    def progress(stage, fraction):
        if stage == "inference" and not killed:
            killed.append((logic.runner.pid, logic.runner.workerPid))
            assert killed[0][0] != killed[0][1]  # launcher and worker
            os.kill(logic.runner.workerPid, signal.SIGKILL)  # what the kernel does when memory runs out

    with pytest.raises(UNetSegError, match="stopped unexpectedly.*out of memory"):
        logic.process(ct, None, TINY_MODEL_ID, device="cpu", overlap=0.9, onProgress=progress)
    assert sceneState(scene) == state
    assert logic.process(ct, None, TINY_MODEL_ID, device="cpu") is not None  # a fresh worker
    assert logic.runner.pid != killed[0][0] and logic.runner.workerPid != killed[0][1]


def test_linear_transform_and_study_placement(logic, ct, scene):
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient pt_201")
    study = shNode.CreateStudyItem(patient, "Planning CT study")
    shNode.CreateItem(study, ct)
    move = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 100.0)  # 100 mm to the left: applied twice, the labels would miss the CT
    move.SetMatrixTransformToParent(shift)
    ct.SetAndObserveTransformNodeID(move.GetID())
    segmentation = logic.process(ct, None, TINY_MODEL_ID, device="cpu")
    assert shNode.GetItemParent(shNode.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetTransformNodeID() == move.GetID()
    # The reference geometry is the CT's own grid (both sit under the same transform), so exporting
    # to a label map on it keeps every voxel of every segment.
    ijkToRas = vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(ijkToRas)
    geometry = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    matrix = [float(v) for v in geometry.split(";")[:16]]
    assert np.allclose(matrix, [ijkToRas.GetElement(r, c) for r in range(4) for c in range(4)])
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    exported = slicer.util.arrayFromVolume(labelmap)
    assert exported.shape == slicer.util.arrayFromVolume(ct).shape
    assert exported.any()


def test_import_model_package_from_zip(logic, modelsDir, tmp_path):
    from SlicerUNetSegLib.testing import makeTinyModel

    package = makeTinyModel(tmp_path / "src", modelId="imported-tiny", seed=3)
    archive = tmp_path / "imported-tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in package.iterdir():
            z.write(file, f"imported-tiny/{file.name}")
    summary = logic.importModel(str(archive))
    assert summary["id"] == "imported-tiny"
    assert "imported-tiny" in [m["id"] for m in logic.listModels()]
    with pytest.raises(UNetSegError, match="already installed"):
        logic.importModel(str(archive))


def test_import_nnunet_folder_asks_for_a_licence(logic, modelsDir):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "nnunet" / \
        "nnUNetTrainer__nnUNetPlansTiny__3d_fullres"
    with pytest.raises(UNetSegError, match="licence"):
        logic.importModel(str(folder / "plans.json"))
    summary = logic.importModel(str(folder / "plans.json"), licence="research use only")
    assert summary["licence"] == "research use only"
    assert summary["labels"][0] == "Brainstem"
    assert summary["id"] in [m["id"] for m in logic.listModels()]


def test_parameter_node_survives_scene_save_and_load(logic, ct, scene, tmp_path):
    parameters = logic.getParameterNode()
    parameters.inputVolume = ct
    parameters.modelId, parameters.device = TINY_MODEL_ID, "cpu"
    parameters.overrideWindow, parameters.windowLevel, parameters.windowWidth = True, -600.0, 1500.0
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    loaded.Connect()
    slicer.mrmlScene = loaded
    restored = logic.getParameterNode()
    assert (restored.modelId, restored.device, restored.overrideWindow) == (TINY_MODEL_ID, "cpu", True)
    assert (restored.windowLevel, restored.windowWidth) == (-600.0, 1500.0)
    assert restored.inputVolume is not None and restored.inputVolume.GetName() == "Synthetic CT"


@pytest.mark.parametrize("data", ["openkbp", "synthetic"])
def test_module_self_test_passes(data, scene, modelsDir, monkeypatch, tmp_path):
    """The self-test Slicer runs (and CI runs in a real Slicer): real scan, or the synthetic one with an
    oblique direction when no data is present; real engine on the CPU."""
    import SlicerUNetSeg

    if data == "synthetic":
        monkeypatch.setenv("UNETSEG_DATA", str(tmp_path / "no-data-here"))
    SlicerUNetSeg.SlicerUNetSegTest().runTest()


def test_models_are_listed_before_dependencies_are_installed(modelsDir, monkeypatch):
    """A fresh Slicer has no jsonschema: the panel must still list models so Segment can install it."""
    from SlicerUNetSegLib.logic import SlicerUNetSegLogic

    monkeypatch.setitem(__import__("sys").modules, "jsonschema", None)
    assert TINY_MODEL_ID in [m["id"] for m in SlicerUNetSegLogic.listModels()]


def test_dependencies_ask_before_installing_and_explain_a_missing_pytorch(monkeypatch):
    from SlicerUNetSegLib import dependencies

    asked = []
    monkeypatch.setattr(dependencies, "REQUIREMENTS", dependencies.REQUIREMENTS + ["no-such-package>=1"])
    assert dependencies.ensureDependencies(lambda text: asked.append(text) or False) is False
    assert asked and "no-such-package" in asked[0]  # declined: nothing installed
    monkeypatch.setattr(dependencies, "torchStatus", lambda: (None, None))
    monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils", None)
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        dependencies.ensureDependencies(lambda text: True)


def test_self_test_runs_without_torch_with_a_stand_in_worker(scene, monkeypatch, tmp_path):
    """A fresh Slicer, or the Extensions Index build machines: no torch, no MONAI, no jsonschema. The
    self-test must not fail with ModuleNotFoundError; it runs the Slicer side with a stand-in runner."""
    import sys

    import SlicerUNetSeg
    from SlicerUNetSegLib import dependencies

    monkeypatch.setenv("UNETSEG_DATA", str(tmp_path / "no-data-here"))
    monkeypatch.setattr(dependencies, "torchStatus", lambda: (None, None))
    for name in ("torch", "monai", "jsonschema"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them raises ImportError
    SlicerUNetSeg.SlicerUNetSegTest().runTest()


def test_self_test_through_slicer_testing_run_unit_test(scene, modelsDir, monkeypatch, tmp_path):
    """What the CI workflow runs in Slicer: slicer.testing.runUnitTest (Slicer's own code)."""
    monkeypatch.setenv("UNETSEG_DATA", str(tmp_path / "no-data-here"))
    slicer.testing.runUnitTest([str(harness.MODULE_DIR)], "SlicerUNetSeg")


def test_title_category_and_help_are_translatable(monkeypatch):
    """As Slicer's module template: _() for the text (context: the file), and the category in
    qSlicerAbstractCoreModule's context, so that it merges with Slicer's translated "Segmentation"."""
    import SlicerUNetSeg

    asked = []
    monkeypatch.setattr(slicer.app, "translate",
                        lambda context, text: asked.append((context, text)) or f"<{text}>", raising=False)
    parent = harness.moduleParent()
    SlicerUNetSeg.SlicerUNetSeg(parent)
    assert parent.title == "<UNet Segmentation>"
    assert parent.categories == ["<Segmentation>"]
    assert ("qSlicerAbstractCoreModule", "Segmentation") in asked
    assert ("SlicerUNetSeg", "UNet Segmentation") in asked
    assert parent.helpText.startswith("<") and parent.acknowledgementText.startswith("<")


def test_pip_failure_is_the_modules_error_with_pips_output(monkeypatch):
    import subprocess
    import types

    from SlicerUNetSegLib import dependencies

    monkeypatch.setattr(dependencies, "missingRequirements", lambda: ["monai>=1.4"])
    failure = subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", "monai>=1.4"],
                                            output="ERROR: Could not find a version (no network)")

    def pipInstall(requirements):
        raise failure

    monkeypatch.setattr(slicer.util, "pip_install", pipInstall)
    with pytest.raises(dependencies.DependencyError, match="pip failed") as caught:
        dependencies.ensureDependencies(lambda text: True)
    assert "no network" in caught.value.details
    # the PyTorch extension's installer runs pip too (light-the-torch), and raises the same way
    logic = types.SimpleNamespace(installTorch=lambda **kwargs: pipInstall(None))
    monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils",
                        types.SimpleNamespace(PyTorchUtilsLogic=lambda: logic))
    monkeypatch.setattr(dependencies, "torchStatus", lambda: (None, None))
    with pytest.raises(dependencies.DependencyError, match="Installing PyTorch failed"):
        dependencies.ensureDependencies(lambda text: True)


@pytest.mark.parametrize("version, accepted", [("2.2.0", False), ("2.4.0", False), ("2.4.1", True),
                                               ("2.4.1+cu121", True), ("2.13.0+cpu", True)])
def test_pytorch_older_than_2_4_1_is_refused(version, accepted, monkeypatch):
    """With torch 2.2 to 2.4.0 pip can only pick monai 1.4.0, which would downgrade Slicer 5.10's
    numpy 2."""
    import types

    from SlicerUNetSegLib import dependencies

    monkeypatch.setattr(dependencies, "torchStatus", lambda: (version, None))
    monkeypatch.setattr(dependencies, "missingRequirements", lambda: [])
    monkeypatch.setitem(__import__("sys").modules, "PyTorchUtils", types.SimpleNamespace())
    if accepted:
        assert dependencies.ensureDependencies(lambda text: True) is True
    else:
        with pytest.raises(RuntimeError, match="needs 2.4.1 or newer"):
            dependencies.ensureDependencies(lambda text: True)


def test_simpleitk_is_left_to_slicer():
    """Slicer bundles SimpleITK (2.2.1 in 5.6); a requirement above it would make pip replace it."""
    from SlicerUNetSegLib import dependencies

    assert not [r for r in dependencies.REQUIREMENTS if r.lower().startswith("simpleitk")]
