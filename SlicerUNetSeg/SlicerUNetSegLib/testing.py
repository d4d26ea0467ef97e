"""Helpers for the module's self-test and the pytest suites: test data, and a real (untrained) model.

The tiny model is a genuine model package (schema-valid metadata, SHA-256-checked weights, a MONAI
UNet) with random weights: it exercises the whole path (worker, sliding windows, resampling back to
the input grid, segment building) in seconds on a CPU. It says nothing about accuracy; tests of
accuracy use the shipped default model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TINY_MODEL_ID = "unetseg-tiny-test"
SCT_ANATOMY = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
TINY_LABELS = [
    {"value": 1, "name": "Brainstem", "color": [119, 159, 176],
     "terminology": {"category": SCT_ANATOMY, "type": {"scheme": "SCT", "code": "15926001",
                                                         "meaning": "Brainstem"}}},
    {"value": 2, "name": "RightParotid", "color": [194, 98, 0],
     "terminology": {"category": SCT_ANATOMY,
                     "type": {"scheme": "SCT", "code": "45289007", "meaning": "Parotid gland"},
                     "type_modifier": {"scheme": "SCT", "code": "24028007", "meaning": "Right"}}},
    {"value": 3, "name": "Mandible", "color": [241, 214, 145],
     "terminology": {"category": SCT_ANATOMY, "type": {"scheme": "SCT", "code": "91609006",
                                                         "meaning": "Mandible"}}},
]


def repositoryRoot() -> Path:
    return Path(__file__).resolve().parents[2]


def dataRoot() -> Path | None:
    """UNETSEG_DATA, else ../shared/data next to the repository; None when neither exists."""
    env = os.environ.get("UNETSEG_DATA")
    path = Path(env) if env else repositoryRoot().parent / "shared" / "data"
    return path if path.is_dir() else None


def openkbpCase(case: str = "pt_201") -> tuple[Path, Path] | None:
    """(CT, clinical label map) of one OpenKBP validation case, or None without the data."""
    root = dataRoot()
    if root is None:
        return None
    image = root / "openkbp_hn_oar" / "imagesTr" / f"{case}_0000.nii.gz"
    label = root / "openkbp_hn_oar" / "labelsTr" / f"{case}.nii.gz"
    return (image, label) if image.is_file() and label.is_file() else None


def makeTinyModel(folder: str | os.PathLike, modelId: str = TINY_MODEL_ID, seed: int = 0,
                  inputs: tuple[str, ...] = ("CT",)) -> Path:
    """Write a small random-weight model package into ``folder/modelId``; returns its path."""
    import torch

    from unetseg_engine.modelpkg import METADATA_FILE, load_package, sha256_of
    from unetseg_engine.networks import build_network

    package = Path(folder) / modelId
    package.mkdir(parents=True, exist_ok=True)
    network = {"architecture": "UNet", "spatial_dims": 3,
               "params": {"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "instance"}}
    torch.manual_seed(seed)
    core = build_network("UNet", 3, len(inputs), len(TINY_LABELS) + 1, network["params"])
    weights = package / "model.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}, weights)
    meta = {
        "schema_version": 1, "id": modelId, "version": "0.0.1", "title": "Tiny test model (untrained)",
        "description": "Random weights, for testing the pipeline only; its labels are meaningless.",
        "licence": "Apache-2.0", "modality": "CT", "inputs": [{"name": n} for n in inputs],
        "network": network,
        "preprocessing": {"spacing_mm": [6.0, 6.0, 6.0],
                          "normalization": {"method": "ct_window", "level": 40.0, "width": 400.0}},
        "inference": {"patch_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 1},
        "output": {"type": "multiclass"}, "labels": TINY_LABELS,
        "weights": {"file": weights.name, "sha256": sha256_of(weights)},
        "expected_runtime": {"cpu_s": 5},
    }
    (package / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    load_package(package)
    return package


def syntheticCt(shape_kji=(40, 64, 64), seed: int = 0) -> np.ndarray:
    """A small CT-like volume (air, a soft-tissue ellipsoid, a bright 'bone' ring), int16 HU."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji, dtype=float)
    centre = [(s - 1) / 2 for s in shape_kji]
    r = ((k - centre[0]) / (shape_kji[0] * 0.45)) ** 2 + ((j - centre[1]) / (shape_kji[1] * 0.4)) ** 2 + \
        ((i - centre[2]) / (shape_kji[2] * 0.35)) ** 2
    volume = np.full(shape_kji, -1000.0)
    volume[r < 1] = 40
    volume[(r > 0.55) & (r < 0.7)] = 900
    return (volume + rng.normal(0, 10, shape_kji)).astype(np.int16)


def selfTestProcess(test, logicClass) -> None:
    """The body of SlicerUNetSegTest: a real scan (or a synthetic one with a non-identity direction
    when no test data is present), the real engine in its worker on the CPU, a real small model (the
    default model when installed, else a tiny random-weight one), then checks of segment names and
    count, geometry, and that the input volume is unchanged. ``test`` is a unittest.TestCase."""
    import shutil
    import tempfile

    import slicer

    from SlicerUNetSegLib.geometry import ijkToRasArray, loadVolumeFile

    test.delayDisplay("Loading a scan")
    case = openkbpCase("pt_201")
    if case is not None:
        volume = loadVolumeFile(case[0], "pt_201 CT")
    else:  # a synthetic CT with a non-identity direction
        volume = slicer.util.addVolumeFromArray(syntheticCt(), name="Synthetic CT")
        volume.SetIJKToRASDirections([[-1, 0, 0], [0, 0, 1], [0, -1, 0]])
        volume.SetSpacing(4.0, 4.0, 5.0)
    before = slicer.util.arrayFromVolume(volume).copy()
    geometryBefore = ijkToRasArray(volume)

    modelId = "openkbp-hn-oar" if case is not None and any(
        m["id"] == "openkbp-hn-oar" for m in logicClass.listModels()) else None
    modelsDir = None
    if modelId is None:
        modelsDir = tempfile.mkdtemp(prefix="SlicerUNetSegTest-")
        modelId = str(makeTinyModel(modelsDir))  # a package folder works as a model id
    logic = logicClass()
    try:
        test.delayDisplay(f"Segmenting with {os.path.basename(modelId)} on the CPU")
        segmentation = logic.process(volume, None, modelId, device="cpu")
        model = logic.getModel(modelId)
    finally:
        logic.shutdown()
        if modelsDir:
            shutil.rmtree(modelsDir, ignore_errors=True)

    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    test.assertEqual(names, model.label_names)
    referenceId = segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole())
    test.assertEqual(referenceId, volume.GetID())
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.modules.segmentations.logic().ExportAllSegmentsToLabelmapNode(
        segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    test.assertTrue(np.allclose(ijkToRasArray(labelmap), geometryBefore, atol=1e-4))
    test.assertEqual(slicer.util.arrayFromVolume(labelmap).shape, before.shape)
    test.assertGreater(int(np.count_nonzero(slicer.util.arrayFromVolume(labelmap))), 0)
    test.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
    test.assertTrue(np.array_equal(ijkToRasArray(volume), geometryBefore))
    test.delayDisplay(f"Test passed ({logic.job.timings.get('total_s', 0):.1f} s)")
