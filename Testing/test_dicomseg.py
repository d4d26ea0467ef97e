"""DICOM SEG output, checked by readers that are not ours: dcmqi's ``segimage2itkimage`` must give back
the engine's masks voxel for voxel on the source grid, and dicom3tools' ``dciodvfy`` must find no
error. The source is a real CT (OpenKBP pt_201) written as a CT series with clinical attributes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import helpers
from helpers import OBLIQUE, make_package, openkbp, synthetic_ct, tiny_meta, write_ct_series
from unetseg_engine.cli import main
from unetseg_engine.imageio import read_image
from unetseg_engine.pipeline import segment_files


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        how = "pip install dcmqi" if name.startswith("seg") else "apt-get install dicom3tools"
        pytest.skip(f"{name} not installed ({how})")
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "pt_201"
    study = write_ct_series(sitk.ReadImage(str(openkbp("pt_201")[0])), folder)
    return folder, study


@pytest.fixture(scope="module")
def biased_package(tmp_path_factory):
    """A tiny 3-class model that finds labels 1 and 2 somewhere and label 3 nowhere."""
    return make_package(tmp_path_factory.mktemp("models") / "tiny-biased", tiny_meta("tiny-biased"),
                        bias={1: 2.0, 2: 1.0, 3: -20.0})


def dcmqi_masks(seg_path: Path, out: Path, reference: sitk.Image) -> tuple[dict[int, np.ndarray], dict]:
    """Segment number -> mask from dcmqi, resampled onto ``reference``'s grid (nearest neighbour)."""
    out.mkdir()
    run = subprocess.run([_tool("segimage2itkimage"), "--inputDICOM", str(seg_path),
                          "--outputDirectory", str(out), "-t", "nrrd"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    masks = {}
    for file in out.glob("*.nrrd"):
        image = sitk.ReadImage(str(file))
        # dcmqi rebuilds the grid from the frames' positions: it must be the source's
        np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
        back = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        masks[int(file.stem)] = sitk.GetArrayFromImage(back) > 0
    return masks, json.loads((out / "meta.json").read_text())


def test_dcmqi_reads_back_the_shipped_models_organs_voxel_for_voxel(series, tmp_path):
    folder, _ = series
    out = tmp_path / "result.dcm"
    result, _ = segment_files([str(folder)], str(out), quiet=True)
    source = read_image(folder)
    labels = sitk.GetArrayViewFromImage(result.label_map)
    masks, meta = dcmqi_masks(out, tmp_path / "dcmqi", source)
    assert sorted(masks) == list(range(1, 8))
    clinical = sitk.Resample(sitk.ReadImage(str(openkbp("pt_201")[1])), source, sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0)
    clinical = sitk.GetArrayFromImage(clinical)  # a copy: a view would outlive its image
    dice = []
    for n, label in enumerate(result.model.labels, start=1):
        expected = labels == label["value"]
        assert expected.sum() > 100, label["name"]  # real organs, not empty masks
        assert np.array_equal(masks[n], expected), label["name"]
        truth = clinical == label["value"]
        dice.append(2 * (masks[n] & truth).sum() / (masks[n].sum() + truth.sum()))
    # in patient space, dcmqi's masks lie on the clinical contours (a flipped frame order would not)
    assert np.mean(dice) > 0.65, dice
    attributes = [group[0] for group in meta["segmentAttributes"]]
    for attr, label in zip(attributes, result.model.labels):
        assert attr["SegmentLabel"] == label["name"]
        assert attr["SegmentAlgorithmType"] == "AUTOMATIC"
        assert attr["SegmentAlgorithmName"] == result.model.id
        term = label["terminology"]
        assert attr["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == term["type"]["code"]
        assert attr["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == term["category"]["code"]
        np.testing.assert_allclose(attr["recommendedDisplayRGBValue"], label["color"], atol=2)


def test_overlapping_multilabel_masks_survive(series, tmp_path, tiny_multilabel_package):
    folder, _ = series
    out = tmp_path / "multi.dcm"
    result, _ = segment_files([str(folder)], str(out), model=str(tiny_multilabel_package.path),
                              quiet=True)
    masks, _ = dcmqi_masks(out, tmp_path / "dcmqi", read_image(folder))
    ours = {}
    for n, label in enumerate(tiny_multilabel_package.labels, start=1):
        box, mask = result.masks[label["value"]]
        ours[n] = np.zeros(masks[n].shape, bool)
        ours[n][box.slices_kji()] = mask
        assert np.array_equal(masks[n], ours[n]), label["name"]
    assert (ours[1] & ours[2]).any()  # the case that needs one binary plane per segment


def test_seg_references_its_source_and_copies_patient_and_study(series, tmp_path, biased_package):
    folder, study = series
    out = tmp_path / "r.dcm"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(biased_package.path), "-q"]) == 0
    seg = pydicom.dcmread(out)
    sources = {}
    for file in folder.iterdir():
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    for key, value in study.items():
        assert str(seg.get(key)) == value, key
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)
    # every frame names the CT slice it lies on
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient],
                                   atol=1e-3)
    # every label is a segment, the empty one too (numbers stay the model's label order)
    segments = seg.SegmentSequence
    assert [s.SegmentLabel for s in segments] == biased_package.label_names
    frames_of = {s.SegmentNumber: 0 for s in segments}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        frames_of[frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber] += 1
    assert frames_of[1] > 0 and frames_of[2] > 0 and frames_of[3] == 0
    algorithm = segments[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny-biased", "0.0.1")
    assert segments[0].SegmentAlgorithmType == "AUTOMATIC"
    assert len(segments[0].RecommendedDisplayCIELabValue) == 3


def test_a_corrected_segment_is_written_as_semiautomatic(series, tmp_path, biased_package):
    """After a review the Slicer module tags edited segments; the SEG says SEMIAUTOMATIC for them
    (read back by dcmqi) and AUTOMATIC for the others, and an unknown type or label is refused."""
    from unetseg_engine.dicomseg import write_dicom_seg
    from unetseg_engine.dicomseries import one_series
    from unetseg_engine.errors import UNetSegError

    folder, _ = series
    result, _ = segment_files([str(folder)], str(tmp_path / "labels.nrrd"), model=str(biased_package.path),
                              quiet=True)
    names = biased_package.label_names
    out = tmp_path / "reviewed.dcm"
    write_dicom_seg(out, result.label_map, result.model.labels, one_series(folder), result.model.meta,
                    algorithm_types={names[1]: "SEMIAUTOMATIC"})
    _, meta = dcmqi_masks(out, tmp_path / "dcmqi", read_image(folder))
    types = [group[0]["SegmentAlgorithmType"] for group in meta["segmentAttributes"]]
    assert types == ["AUTOMATIC", "SEMIAUTOMATIC", "AUTOMATIC"]
    assert pydicom.dcmread(out).SegmentSequence[1].SegmentAlgorithmType == "SEMIAUTOMATIC"
    for bad, match in (({names[0]: "MANUAL"}, "not one of AUTOMATIC, SEMIAUTOMATIC"),
                       ({"Liver": "SEMIAUTOMATIC"}, "does not have")):
        with pytest.raises(UNetSegError, match=match):
            write_dicom_seg(tmp_path / "bad.dcm", result.label_map, result.model.labels,
                            one_series(folder), result.model.meta, algorithm_types=bad)
        assert not (tmp_path / "bad.dcm").exists()


def test_dciodvfy_finds_no_error(series, tmp_path, biased_package):
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools); the DICOM validator check "
                    "cannot run here")
    folder, _ = series
    out = tmp_path / "r.dcm"
    assert main(["segment", str(folder), "-o", str(out), "--output-type", "dicom-seg",
                 "--model", str(biased_package.path), "-q"]) == 0
    run = subprocess.run([tool, str(out)], capture_output=True, text=True)
    report = run.stdout + run.stderr
    assert "Segmentation" in report  # it recognised the IOD
    assert [line for line in report.splitlines() if line.startswith("Error")] == [], report


def _series_variant(tmp_path, **kwargs) -> Path:
    """A synthetic oblique CT written as a series, with ``write_ct_series``'s defects."""
    folder = tmp_path / "variant"
    write_ct_series(synthetic_ct(shape_kji=(30, 40, 36), spacing=(1.0, 1.2, 2.0), direction=OBLIQUE),
                    folder, **kwargs)
    return folder


def _two_series(tmp_path) -> Path:
    folder = _series_variant(tmp_path)
    write_ct_series(synthetic_ct(shape_kji=(10, 40, 36)), folder, prefix="second")
    return folder


def _mixed_orientation(tmp_path) -> Path:
    folder = _series_variant(tmp_path)
    ds = pydicom.dcmread(folder / "CT0007.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an oblique stack
    ds.save_as(folder / "CT0007.dcm")
    return folder


def _nifti(tmp_path) -> str:
    return str(helpers.synthetic_ct_file(tmp_path / "in"))


BAD = {
    # name: (inputs and output from tmp_path, words in the message)
    "NIfTI input, .dcm output": (lambda t: ([_nifti(t)], ["-o", str(t / "out" / "r.dcm")]),
                                 "needs a DICOM series folder"),
    "NIfTI input, --output-type dicom-seg": (
        lambda t: ([_nifti(t)], ["-o", str(t / "out" / "r"), "--output-type", "dicom-seg"]),
        "needs a DICOM series folder"),
    "name and type disagree": (
        lambda t: ([_nifti(t)], ["-o", str(t / "out" / "r.nii.gz"), "--output-type", "dicom-seg"]),
        "does not match --output-type"),
    "missing slice": (lambda t: ([str(_series_variant(t, skip=(12,)))], ["-o", str(t / "out" / "r.dcm")]),
                      "missing slices"),
    "missing slice, NIfTI output": (
        lambda t: ([str(_series_variant(t, skip=(12, 13)))], ["-o", str(t / "out" / "r.nii.gz")]),
        "missing slices"),
    "varying spacing": (lambda t: ([str(_series_variant(t, shift_mm={k: 1.0 for k in range(20, 30)}))],
                                   ["-o", str(t / "out" / "r.dcm")]), "varying slice spacing"),
    "two slices at one position": (
        lambda t: ([str(_series_variant(t, shift_mm={5: -2.0}))], ["-o", str(t / "out" / "r.nii.gz")]),
        "two slices at the same position"),
    "several series in one folder": (lambda t: ([str(_two_series(t))], ["-o", str(t / "out" / "r.nii.gz")]),
                                     "holds 2 DICOM series"),
    "mixed orientations": (lambda t: ([str(_mixed_orientation(t))], ["-o", str(t / "out" / "r.nii.gz")]),
                           "mixes slice orientations"),
    "MR series for a CT model": (
        lambda t: ([str(_series_variant(t, modality="MR"))], ["-o", str(t / "out" / "r.nii.gz")]),
        "is MR (its Modality attribute), but model 'tiny-biased' segments CT scans"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dicom_seg_input_gives_one_clear_line(case, tmp_path, biased_package, capsys):
    make, words = BAD[case]
    (tmp_path / "out").mkdir()
    inputs, output = make(tmp_path)
    capsys.readouterr()
    status = main(["segment", *inputs, *output, "--model", str(biased_package.path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("unetseg: error: "), err
    assert words in err[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_an_anonymised_series_without_uids_is_refused_for_dicom_seg(tmp_path, biased_package, capsys):
    from helpers import data_path

    folder = data_path("totalsegmentator_example_ct", "tests", "reference_files", "example_ct_dicom")
    status = main(["segment", str(folder), "-o", str(tmp_path / "r.dcm"), "--model",
                   str(biased_package.path), "-q"])
    assert status == 2
    assert "must reference its source by UIDs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
