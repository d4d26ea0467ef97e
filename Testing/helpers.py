"""Shared test helpers: where the real data is, and small real model packages.

The packages built here are real: a MONAI network, randomly initialised with a fixed seed, saved and
loaded through the engine's own package code (schema, SHA-256, weights_only). Nothing is stubbed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


def data_root() -> Path:
    return Path(os.environ.get("UNETSEG_DATA", DEFAULT_DATA))


def data_path(*parts: str) -> Path:
    """A path under the shared data folder; skips the test (saying why) when it is not there."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path}: set UNETSEG_DATA to the shared data folder "
                    "(it holds openkbp_hn_oar/, totalsegmentator_example_ct/, ...)")
    return path


def openkbp(case: str = "pt_201") -> tuple[Path, Path]:
    """(CT, label) paths of an OpenKBP case."""
    root = data_path("openkbp_hn_oar")
    return root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz"


def rotation(axis, degrees: float):
    """A 3x3 rotation matrix about ``axis`` (any 3-vector)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.cos(a) * np.eye(3) + np.sin(a) * cross + (1 - np.cos(a)) * np.outer(axis, axis)


# Geometry for tests that need geometry, not anatomy: oblique (tilted about all three axes), with a
# flipped axis (determinant -1, as a scan stored feet-first) and anisotropic spacing.
OBLIQUE = rotation((1, 2, 3), 25.0)
OBLIQUE_FLIPPED = OBLIQUE @ np.diag([1.0, -1.0, 1.0])


def synthetic_ct(shape_kji=(40, 48, 56), spacing=(2.0, 2.5, 3.0), direction=None,
                 origin=(-60.0, -80.0, 30.0), seed: int = 0):
    """A small CT-like ``SimpleITK.Image`` (``SlicerUNetSegLib.testing.syntheticCt``, asymmetric, so a
    wrong axis shows) with explicit LPS geometry; identity direction unless ``direction`` (3x3) is
    given. For the suites that check geometry and bad input without the shared data."""
    from SlicerUNetSegLib.testing import syntheticCt
    from unetseg_engine.imageio import image_from_array

    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    return image_from_array(syntheticCt(tuple(shape_kji), seed), spacing, origin, direction)


def synthetic_ct_file(folder: Path, name: str = "synthetic_ct.nii.gz", **geometry) -> Path:
    """``synthetic_ct(**geometry)`` written to ``folder/name``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(synthetic_ct(**geometry), str(folder / name))
    return folder / name


OPENKBP_LABELS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                  "Mandible"]


# Golden output of the shipped default model (1.2.0, CPU, torch runtime) on two OpenKBP cases: each
# organ's centroid in LPS mm and its voxel count. Across the CPU runtimes the centroids agree within
# 0.3 mm; a one-slice shift of the labels moves every centroid by a voxel (3 to 5.4 mm on these scans),
# which the 1 mm tolerance catches along each axis. Regenerate them when the model changes (print
# ``organ_centroids(label_map)`` for both cases) and say so in the commit.
GOLDEN_TOLERANCE_MM = 1.0
GOLDEN_COUNT_TOLERANCE = 0.03
GOLDEN = {
    "pt_201": {"Brainstem": (-4.36, -2.81, 114.29, 319), "SpinalCord": (5.47, 31.23, -53.86, 376),
               "RightParotid": (-61.09, -18.56, 65.76, 271), "LeftParotid": (52.64, -28.76, 71.64, 255),
               "Esophagus": (11.93, 2.35, -80.44, 150), "Larynx": (1.75, -35.61, -23.79, 293),
               "Mandible": (-5.36, -73.47, 36.99, 900)},
    "pt_236": {"Brainstem": (1.6, -0.99, 107.14, 660), "SpinalCord": (-0.08, 19.04, -31.73, 669),
               "RightParotid": (-56.5, -23.65, 64.83, 671), "LeftParotid": (57.69, -27.48, 58.65, 602),
               "Esophagus": (3.76, -3.04, -80.03, 305), "Larynx": (-0.26, -40.41, -16.23, 625),
               "Mandible": (-0.35, -75.61, 48.53, 1495)},
}


def organ_centroids(label_map) -> dict[str, tuple[float, float, float, int]]:
    """Per OpenKBP organ: (x, y, z) centroid in LPS mm and voxel count of a label map."""
    import SimpleITK as sitk
    from scipy import ndimage

    array = sitk.GetArrayViewFromImage(label_map)
    found = {}
    for value, name in enumerate(OPENKBP_LABELS, start=1):
        mask = array == value
        count = int(mask.sum())
        if count:
            kji = ndimage.center_of_mass(mask)
            xyz = label_map.TransformContinuousIndexToPhysicalPoint([float(c) for c in kji[::-1]])
            found[name] = (*(round(c, 2) for c in xyz), count)
    return found


def golden_differences(label_map, case: str) -> list[str]:
    """How a label map of ``case`` differs from the default model's golden output (empty: none)."""
    found = organ_centroids(label_map)
    problems = []
    for name, (*golden_xyz, golden_count) in GOLDEN[case].items():
        if name not in found:
            problems.append(f"{name}: not found")
            continue
        *xyz, count = found[name]
        off = float(np.linalg.norm(np.subtract(xyz, golden_xyz)))
        if off > GOLDEN_TOLERANCE_MM:
            problems.append(f"{name}: centroid {off:.2f} mm from the golden one")
        if abs(count - golden_count) > GOLDEN_COUNT_TOLERANCE * golden_count:
            problems.append(f"{name}: {count} voxels instead of {golden_count}")
    return problems


def tiny_meta(model_id: str = "tiny-test", *, multilabel: bool = False, n_labels: int = 3,
              n_inputs: int = 1, modality: str = "CT", spatial_dims: int = 3,
              label_names: list[str] | None = None) -> dict:
    """Metadata of a small, fast network (weights are added by ``write_package``)."""
    names = label_names or [f"Structure{i + 1}" for i in range(n_labels)]
    patch = [32, 32, 16] if spatial_dims == 3 else [64, 64, 1]
    norm = {"method": "ct_window", "level": 40, "width": 400} if modality == "CT" else \
        {"method": "zscore"}
    crop = {"enabled": True, "threshold": -500.0, "margin_mm": 10.0} if modality == "CT" else \
        {"enabled": False, "threshold": None, "margin_mm": 0.0}
    return {
        "schema_version": 1, "id": model_id, "version": "0.0.1", "title": "Tiny test model",
        "description": "Randomly initialised network for tests", "licence": "Apache-2.0",
        "modality": modality, "inputs": [{"name": f"channel{i}"} for i in range(n_inputs)],
        "network": {"architecture": "UNet", "spatial_dims": spatial_dims,
                    "params": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}},
        "preprocessing": {"spacing_mm": [6.0, 6.0, 6.0], "normalization": norm,
                          "foreground_crop": crop},
        "inference": {"patch_size": patch, "overlap": 0.25, "sw_batch_size": 2},
        "output": {"type": "multilabel" if multilabel else "multiclass"},
        "labels": [{"value": i + 1, "name": n, "color": [40 * i % 256, 200, 100],
                    "terminology": {"category": {"scheme": "SCT", "code": "123037004",
                                                 "meaning": "Anatomical Structure"},
                                    "type": {"scheme": "SCT", "code": "85756007",
                                             "meaning": "Tissue"}}}
                   for i, n in enumerate(names)],
    }


def make_package(folder: Path, meta: dict, seed: int = 0, bias: dict[int, float] | None = None):
    """Build the network of ``meta`` with a fixed seed and write it as a package.

    ``bias`` adds constants to the final layer's bias per output channel, so a random network still
    predicts some voxels of every class (useful to exercise multi-label overlaps).
    """
    import torch

    from unetseg_engine.modelpkg import write_package
    from unetseg_engine.networks import build_network

    torch.manual_seed(seed)
    n_out = len(meta["labels"]) + (0 if meta["output"]["type"] == "multilabel" else 1)
    net = meta["network"]
    model = build_network(net["architecture"], net["spatial_dims"], len(meta["inputs"]), n_out,
                          net["params"])
    state = model.state_dict()
    if bias:
        last_bias = [k for k in state if k.endswith("bias") and state[k].numel() == n_out][-1]
        for channel, value in bias.items():
            state[last_bias][channel] += value
    return write_package(folder, meta, state)


def write_ct_series(image, folder: Path, *, skip: tuple[int, ...] = (),
                    shift_mm: dict[int, float] | None = None, study_uid: str | None = None,
                    modality: str = "CT", prefix: str | None = None) -> dict:
    """Write ``image`` (HU, any direction) as a CT Image Storage series of one file per slice, with the
    attributes a clinical series has (patient, study, series and frame-of-reference UIDs, positions,
    orientation, spacing, thickness, rescale).

    ``skip`` leaves slices out (a series with missing slices); ``shift_mm`` moves slices along the
    normal (a varying spacing). Files are named ``<prefix or modality>NNNN.dcm``. Returns the
    patient/study attributes written, for comparison.
    """
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    study = {"PatientName": "Test^Series", "PatientID": "UNETSEG-0001", "PatientBirthDate": "19600101",
             "PatientSex": "F", "StudyInstanceUID": study_uid or generate_uid(),
             "StudyDate": "20240102", "StudyTime": "101500", "AccessionNumber": "ACC0001",
             "StudyID": "S1", "ReferringPhysicianName": "Doctor^Referring"}
    series_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(array.shape[0]):
        if k in skip:
            continue
        position = origin + direction[:, 2] * spacing[2] * k
        position = position + direction[:, 2] * (shift_mm or {}).get(k, 0.0)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = CTImageStorage
        for key, value in study.items():
            setattr(ds, key, value)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 3
        ds.SeriesDescription, ds.FrameOfReferenceUID = "unetseg test series", frame_uid
        ds.PositionReferenceIndicator, ds.PatientPosition = "", "HFS"
        ds.Manufacturer, ds.InstanceNumber, ds.AcquisitionNumber = "Test", k + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.SliceThickness = 120, round(float(spacing[2]), 6)
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in
                                      (*direction[:, 0], *direction[:, 1])]
        # row spacing (j), then column spacing (i); DS values hold at most 16 characters
        ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(array[k].astype(np.int16)).tobytes()
        ds.save_as(folder / f"{prefix or modality}{k + 1:04d}.dcm", enforce_file_format=True)
    return study


def refused(capsys, argv, *words):
    """Run the command line; it must fail with one ``unetseg: error:`` line holding ``words``."""
    from unetseg_engine.cli import main

    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("unetseg: error: "), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


class ServerProcess:
    """``unetseg serve`` in a subprocess on loopback (any free port, or ``port``); its stderr is
    collected in ``log`` (the tests check that the token never appears there)."""

    def __init__(self, state: Path, token_file: Path, models: list[Path], port: int = 0,
                 max_upload_mb: float = 3.0) -> None:
        import subprocess
        import sys
        import threading
        import time

        env = dict(os.environ, PYTHONPATH=str(REPO / "SlicerUNetSeg"), PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "unetseg_engine.cli", "serve", "--models", *map(str, models),
             "--port", str(port), "--token-file", str(token_file), "--state-dir", str(state),
             "--runtime", "torch", "--max-upload-mb", str(max_upload_mb), "--device", "cpu"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log: list[str] = []
        deadline = time.monotonic() + 300  # a loaded CI machine: torch's import alone takes seconds
        try:
            for line in self.popen.stderr:
                self.log.append(line)
                if "listening on" in line:
                    self.url = line.split("listening on ")[1].split()[0]
                    break
                assert time.monotonic() < deadline, "".join(self.log)
            else:
                raise AssertionError("the server did not start:\n" + "".join(self.log))
        except BaseException:
            self.stop(9)  # never leave a server behind
            raise
        threading.Thread(target=lambda: self.log.extend(self.popen.stderr), daemon=True).start()
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = 15) -> None:
        """SIGTERM (a graceful stop) by default; SIGKILL (9) to simulate a crash."""
        import subprocess

        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
