"""``unetseg batch``: finding scans, one result, log and marker per study, going on after a failure,
resuming, the summary CSV (volumes checked against the written results), and flat memory."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from helpers import make_package, openkbp, tiny_meta, write_ct_series
from unetseg_engine.batch import BatchRunner, find_scans
from unetseg_engine.cli import main


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A tiny 3-class model that finds labels 1 and 2 on a CT."""
    return make_package(tmp_path_factory.mktemp("models") / "tiny-batch", tiny_meta("tiny-batch"),
                        bias={1: 2.0, 2: 1.0})


def _ct(first: int = 40, last: int = 80) -> sitk.Image:
    return sitk.ReadImage(str(openkbp("pt_201")[0]))[:, :, first:last]


@pytest.fixture
def tree(tmp_path):
    """patient1/ct.nii.gz, patient2/dicom/ (a CT and an MR series in one folder), a garbage scan,
    and a Slicer segmentation that is a result, not a scan."""
    root = tmp_path / "in"
    (root / "patient1").mkdir(parents=True)
    sitk.WriteImage(_ct(), str(root / "patient1" / "ct.nii.gz"))
    sitk.WriteImage(_ct() > 0, str(root / "patient1" / "old.seg.nrrd"))
    study = write_ct_series(_ct(50, 90), root / "patient2" / "dicom")
    write_ct_series(_ct(50, 60), root / "patient2" / "dicom", study_uid=study["StudyInstanceUID"],
                    modality="MR")
    (root / "broken").mkdir()
    (root / "broken" / "scan.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    return root


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_scans_are_files_and_dicom_series_filtered_by_modality(tree):
    scans, skipped = find_scans(tree, "CT")
    assert [s.study for s in scans] == ["broken/scan.nrrd", "patient1/ct.nii.gz", "patient2/dicom"]
    assert skipped == {"MR": 1}
    assert scans[2].modality == "CT" and len(scans[2].series.files) == 40
    everything, skipped = find_scans(tree, None)
    assert sorted(s.modality for s in everything) == ["", "", "CT", "MR"] and skipped == {}


def _label_volumes(result_path: Path, names: list[str]) -> dict[str, float]:
    import slicerio

    seg = slicerio.read_segmentation(str(result_path))
    voxel_ml = abs(np.linalg.det(np.array(seg["ijkToLPS"])[:3, :3])) / 1000
    voxels = seg["voxels"]
    return {s["name"]: float((voxels == s["labelValue"]).sum() * voxel_ml) for s in seg["segments"]
            if s["name"] in names}


def test_batch_writes_results_logs_and_a_summary_and_goes_on_after_a_failure(tree, tmp_path, package,
                                                                             capsys):
    out = tmp_path / "out"
    status = main(["batch", str(tree), "-o", str(out), "--model", str(package.path)])
    err = capsys.readouterr().err
    assert status == 1  # one scan failed; the others were done
    assert "3 scan(s)" in err and "left out, not CT: 1 MR" in err and "ETA" in err
    rows = {r["study"]: r for r in read_csv(out / "summary.csv")}
    assert [rows[k]["status"] for k in sorted(rows)] == ["failed", "done", "done"]
    assert "Could not read" in rows["broken/scan.nrrd"]["message"]
    assert not (out / "broken" / "scan" / "segmentation.seg.nrrd.done.json").exists()
    assert "error: Could not read" in (out / "broken" / "scan" / "log.txt").read_text()
    dicom_row = rows["patient2/dicom"]
    assert dicom_row["modality"] == "CT" and dicom_row["series"].startswith("1.2.")
    for row, folder in [(rows["patient1/ct.nii.gz"], out / "patient1" / "ct"),
                        (dicom_row, out / "patient2" / "dicom" / dicom_row["series"])]:
        assert (folder / "segmentation.seg.nrrd.done.json").exists()
        assert "timings:" in (folder / "log.txt").read_text()
        volumes = _label_volumes(folder / "segmentation.seg.nrrd", package.label_names)
        assert volumes["Structure1"] > 10  # real masks, and the CSV tells their size
        for name, ml in volumes.items():
            assert float(row[f"{name}_ml"]) == pytest.approx(ml, abs=1e-3), name
        assert float(row["time_s"]) > 0


def test_batch_resumes_skipping_only_studies_with_a_completed_marker(tree, tmp_path, package, capsys):
    out = tmp_path / "out"
    main(["batch", str(tree), "-o", str(out), "--model", str(package.path), "-q"])
    nifti = out / "patient1" / "ct" / "segmentation.seg.nrrd"
    dicom = next((out / "patient2" / "dicom").glob("*/segmentation.seg.nrrd"))
    before = {p: p.stat().st_mtime_ns for p in (nifti, dicom)}
    # a crash after the DICOM study's result was renamed into place, before its marker was written
    Path(f"{dicom}.done.json").unlink()
    main(["batch", str(tree), "-o", str(out), "--model", str(package.path)])
    err = capsys.readouterr().err
    assert "patient1/ct: done before, skipped" in err
    assert nifti.stat().st_mtime_ns == before[nifti]  # not redone
    assert dicom.stat().st_mtime_ns != before[dicom]  # redone: no marker, so not trusted
    rows = {r["study"]: r["status"] for r in read_csv(out / "summary.csv")}
    assert rows == {"broken/scan.nrrd": "failed", "patient1/ct.nii.gz": "done before",
                    "patient2/dicom": "done"}
    # another output type is another result: nothing is skipped for it
    main(["batch", str(tree / "patient1"), "-o", str(out / "nii"), "--model", str(package.path),
          "--output-type", "nii.gz", "-q"])
    assert (out / "nii" / "ct" / "segmentation.nii.gz").exists()


def test_batch_dicom_seg_for_series_and_a_clear_failure_for_files(tree, tmp_path, package):
    out = tmp_path / "out"
    status = main(["batch", str(tree), "-o", str(out), "--model", str(package.path),
                   "--output-type", "dicom-seg", "-q"])
    assert status == 1
    rows = {r["study"]: r for r in read_csv(out / "summary.csv")}
    assert "needs a DICOM series" in rows["patient1/ct.nii.gz"]["message"]
    seg = pydicom.dcmread(out / "patient2" / "dicom" / rows["patient2/dicom"]["series"] / "segmentation.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == rows["patient2/dicom"]["series"]


@pytest.mark.parametrize("make, words", [
    (lambda t: [str(t / "missing"), "-o", str(t / "out")], "is not a folder"),
    (lambda t: [str(t), "-o", str(t)], "must not be the input root"),
    (lambda t: [str(t / "empty"), "-o", str(t / "out")], "No scans found"),
])
def test_bad_batch_input_gives_one_clear_line(make, words, tmp_path, package, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["batch", *make(tmp_path), "--model", str(package.path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unetseg: error: ") and words in err[0]


def _rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


@pytest.mark.slow
def test_memory_stays_flat_over_50_batch_runs(tmp_path, package):
    """50 synthetic CTs (a water cylinder in air, 192 x 192 x 48, 3.4 MB each) through one warm model:
    after 10 runs to warm every cache and allocator pool, 40 more must not grow the resident memory.
    Keeping each run's label map alone would add 70 MB."""
    root, rng = tmp_path / "in", np.random.default_rng(0)
    root.mkdir()
    z, y, x = np.mgrid[:48, :192, :192]
    body = (y - 96) ** 2 + (x - 96) ** 2 < 70 ** 2
    for i in range(50):
        noise = rng.integers(-30, 30, body.shape).astype(np.int16)
        image = sitk.GetImageFromArray(np.where(body, 0, -1000).astype(np.int16) + noise)
        image.SetSpacing([1.5, 1.5, 4.0])
        sitk.WriteImage(image, str(root / f"case{i:02d}.nrrd"))
    scans, _ = find_scans(root)
    runner = BatchRunner(package, tmp_path / "out", "seg.nrrd", quiet=True, device="cpu")
    loaded = _rss_mb()
    assert [r["status"] for r in runner.run(scans[:10])] == ["done"] * 10
    warm = _rss_mb()
    assert [r["status"] for r in runner.run(scans[10:])] == ["done"] * 40
    grown = _rss_mb() - warm
    print(f"RSS with the model loaded {loaded:.1f} MB, after 10 runs {warm:.1f} MB, after 50 runs "
          f"{warm + grown:.1f} MB ({grown:+.1f} MB over the last 40)")
    assert grown < 20, f"resident memory grew {grown:.1f} MB over 40 runs"
