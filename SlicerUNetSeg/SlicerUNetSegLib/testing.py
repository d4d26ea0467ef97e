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
from typing import Any

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
    network: dict[str, Any] = {"architecture": "UNet", "spatial_dims": 3,
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
    """A small CT-like volume, int16 HU: air, a soft-tissue ellipsoid with a bright 'bone' ring, and,
    off centre, a dense sphere, a fat blob and an air pocket, so that no flip or rotation of the
    array maps it onto itself (a label map placed with a wrong axis does not line up by chance)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji, dtype=float) / (np.array(shape_kji, float) - 1)[:, None, None, None]

    def ellipsoid(centre, radii):
        return sum(((a - c) / r) ** 2 for a, c, r in zip((k, j, i), centre, radii)) < 1

    volume = np.full(shape_kji, -1000.0)
    volume[ellipsoid((0.5, 0.5, 0.5), (0.45, 0.4, 0.35))] = 40
    ring = ellipsoid((0.5, 0.5, 0.5), (0.45 * 0.84, 0.4 * 0.84, 0.35 * 0.84)) & \
        ~ellipsoid((0.5, 0.5, 0.5), (0.45 * 0.74, 0.4 * 0.74, 0.35 * 0.74))
    volume[ring] = 900
    volume[ellipsoid((0.35, 0.4, 0.62), (0.12, 0.1, 0.08))] = 700  # dense sphere
    volume[ellipsoid((0.62, 0.6, 0.4), (0.1, 0.08, 0.07))] = -100  # fat
    volume[ellipsoid((0.55, 0.35, 0.45), (0.06, 0.05, 0.05))] = -900  # air pocket
    return (volume + rng.normal(0, 10, shape_kji)).astype(np.int16)


class StandInRunner:
    """An ``InferenceRunner`` that needs no torch (as SlicerNNUnet's MockProcess stands in for its
    inference process): it answers each request, on the next ``poll``, with a label map it computes
    with SimpleITK from the input file (intensity bands, one per model label), written where the worker
    would write it. It exercises everything on the Slicer side: checks, writing the inputs, the event
    protocol, reading the labels back, building and placing the segmentation."""

    def __init__(self, labelValues) -> None:
        self.labelValues = list(labelValues)
        self.pending: list[dict[str, Any]] = []  # requests, and the answer to a cancel
        self.active: str | None = None

    def start(self, request) -> None:
        self.active = request["id"]
        self.pending.append(request)

    def requestInfo(self) -> None:
        pass

    def cancel(self) -> None:
        if self.active is not None:
            self.pending = [{"event": "error", "id": self.active, "kind": "cancelled",
                             "message": "Segmentation was cancelled."}]

    def isBusy(self) -> bool:
        return self.active is not None

    def shutdown(self) -> None:
        self.pending, self.active = [], None

    def poll(self):
        import SimpleITK as sitk

        events = []
        for request in self.pending:
            if request.get("event"):  # a cancel answer
                events.append(request)
                continue
            image = sitk.ReadImage(request["inputs"][0]["path"])
            voxels = sitk.GetArrayFromImage(image).astype(np.float32)
            edges = np.quantile(voxels, np.linspace(0.5, 1.0, len(self.labelValues) + 1)[:-1])
            labels = np.zeros(voxels.shape, np.uint8)
            for value, edge in zip(self.labelValues, edges):
                labels[voxels > edge] = value
            out = Path(request["output_dir"])
            out.mkdir(parents=True, exist_ok=True)
            labelImage = sitk.GetImageFromArray(labels)
            labelImage.CopyInformation(image)
            sitk.WriteImage(labelImage, str(out / "labels.nrrd"), useCompression=False)
            events += [{"event": "progress", "id": request["id"], "stage": "inference", "fraction": 1.0},
                       {"event": "done", "id": request["id"], "label_map": str(out / "labels.nrrd"),
                        "masks": None, "timings": {}, "device": "stand-in", "messages": [],
                        "model": request["model"], "warm": False}]
        self.pending, self.active = [], None
        return events


def engineMissing() -> list[str]:
    """What the real worker needs and this Python lacks (read from package metadata; imports nothing)."""
    from SlicerUNetSegLib import dependencies

    torchVersion, _ = dependencies.torchStatus()
    return ([] if torchVersion else ["torch"]) + dependencies.missingRequirements()


def selfTestProcess(test, logicClass) -> None:
    """The body of SlicerUNetSegTest: a real scan (or a synthetic one with a non-identity direction
    when no test data is present), then checks of segment names and count, geometry, and that the input
    volume is unchanged, after segmenting

    - with the real engine in its worker on the CPU and a real small model (the default model when
      installed, else a tiny random-weight one), where PyTorch and the engine's packages are installed;
    - else (a fresh Slicer, the Extensions Index build machines) with ``StandInRunner`` in place of the
      worker and the shipped default model's description, saying that the real engine was not run.

    ``test`` is a unittest.TestCase.
    """
    import shutil
    import tempfile

    import slicer

    from SlicerUNetSegLib.geometry import ijkToRasArray, loadVolumeFile

    test.delayDisplay("Loading a scan")
    case = openkbpCase("pt_201")
    if case is not None:
        volume = loadVolumeFile(str(case[0]), "pt_201 CT")
    else:  # a synthetic CT with a non-identity direction
        volume = slicer.util.addVolumeFromArray(syntheticCt(), name="Synthetic CT")
        volume.SetIJKToRASDirections([[-1, 0, 0], [0, 0, 1], [0, -1, 0]])
        volume.SetSpacing(4.0, 4.0, 5.0)
    before = slicer.util.arrayFromVolume(volume).copy()
    geometryBefore = ijkToRasArray(volume)

    missing = engineMissing()
    modelsDir = None
    if missing:
        from unetseg_engine import modelpkg

        test.delayDisplay(f"PyTorch or the engine's packages are missing ({', '.join(missing)}): the real "
                          "engine is NOT run; the Slicer side runs with a stand-in for the worker. Press "
                          "Segment once in the module to install them, then run this test again.")
        package = Path(modelpkg.__file__).resolve().parents[1] / "Resources" / "Models" / \
            modelpkg.DEFAULT_MODEL_ID
        meta = json.loads((package / modelpkg.METADATA_FILE).read_text("utf-8"))
        model = modelpkg.ModelPackage(package, meta)

        class StandInLogic(logicClass):
            # jsonschema may be missing too: the shipped package is read as plain JSON, as the panel's
            # model list does before the first Segment installs it
            getModel = staticmethod(lambda modelId=None: model)

        logic = StandInLogic(runner=StandInRunner([label["value"] for label in model.labels]))
        modelId = model.id
    else:
        if case is not None and any(m["id"] == "openkbp-hn-oar" for m in logicClass.listModels()):
            modelId = "openkbp-hn-oar"
        else:
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
    what = "with a stand-in for the worker; the real engine was not run" if missing else "real engine"
    test.delayDisplay(f"Test passed ({what}; {logic.job.timings.get('total_s', 0):.1f} s)")
