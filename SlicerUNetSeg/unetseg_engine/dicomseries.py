"""DICOM series on disk: finding them (per folder, by Series Instance UID), checking their slice
geometry, and reading one into a ``SimpleITK.Image``.

Only SimpleITK (GDCM) is used here, so reading DICOM needs no extra package; writing DICOM SEG
(``dicomseg``) needs pydicom and highdicom.

Why the geometry check: ``ImageSeriesReader`` stacks the slices it is given at one spacing. A series
with a missing slice or a varying slice spacing then comes out silently stretched, and labels drawn on
it would not sit on the anatomy. Such series are refused with a message instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UNetSegError

# Relative tolerance on the slice step, plus an absolute floor for rounding in the headers (mm)
STEP_TOLERANCE = 0.01
STEP_FLOOR_MM = 1e-3

TAG_MODALITY = "0008|0060"
TAG_POSITION = "0020|0032"
TAG_ORIENTATION = "0020|0037"
TAG_SERIES_UID = "0020|000e"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_STUDY_UID = "0020|000d"


@dataclass(frozen=True)
class DicomSeries:
    """One series in one folder: its files in slice order (the order the image's k axis follows)."""

    folder: Path
    series_uid: str
    files: tuple[str, ...]
    modality: str
    study_uid: str
    description: str


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _numbers(reader: sitk.ImageFileReader, tag: str, count: int, path: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in _tag(reader, tag).split("\\")])
    except ValueError:
        values = np.array([])
    if values.size != count:
        raise UNetSegError(f"The DICOM file '{Path(path).name}' has no usable {tag} "
                           f"({'ImagePositionPatient' if tag == TAG_POSITION else 'ImageOrientationPatient'})"
                           "; it cannot be placed in a 3D volume.")
    return values


def check_slice_geometry(files: list[str] | tuple[str, ...]) -> None:
    """Refuse a series whose slices are not one regular stack (missing slices, varying spacing,
    mixed orientations or sizes); ``files`` in the order GDCM sorted them."""
    if len(files) < 2:
        return  # a single slice is refused later, as a 2D image
    headers = [_header(f) for f in files]
    orientation = _numbers(headers[0], TAG_ORIENTATION, 6, files[0])
    sizes = {h.GetSize()[:2] for h in headers}
    if len(sizes) > 1:
        raise UNetSegError(f"The DICOM series in '{Path(files[0]).parent}' mixes slice sizes "
                           f"({', '.join(f'{a}x{b}' for a, b in sorted(sizes))}); give one series.")
    for h, f in zip(headers, files):
        if np.abs(_numbers(h, TAG_ORIENTATION, 6, f) - orientation).max() > 1e-4:
            raise UNetSegError(f"The DICOM series in '{Path(f).parent}' mixes slice orientations "
                               f"('{Path(f).name}' differs); it is not one volume.")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([_numbers(h, TAG_POSITION, 3, f) for h, f in zip(headers, files)])
    steps = np.diff(positions @ normal)
    median = float(np.median(steps))
    tolerance = max(abs(median) * STEP_TOLERANCE, STEP_FLOOR_MM)
    if abs(median) <= STEP_FLOOR_MM or np.abs(steps).min() <= STEP_FLOOR_MM:
        raise UNetSegError(f"The DICOM series in '{Path(files[0]).parent}' has two slices at the same "
                           "position (duplicates, or several series with one Series Instance UID).")
    bad = np.flatnonzero(np.abs(steps - median) > tolerance)
    if bad.size:
        i = int(bad[0])
        ratios = steps[bad] / median
        missing = np.all(ratios > 1.5) and np.all(np.abs(ratios - np.round(ratios)) < 0.05)
        raise UNetSegError(
            f"The DICOM series in '{Path(files[0]).parent}' has "
            f"{'missing slices' if missing else 'a varying slice spacing'}: slices are "
            f"{abs(median):.3g} mm apart, but {abs(steps[i]):.3g} mm between '{Path(files[i]).name}' and "
            f"'{Path(files[i + 1]).name}' ({bad.size} irregular gap(s)). Segmenting it would misplace "
            "the labels; export the complete series, or resample it onto a regular grid (e.g. as NIfTI).")


def series_in_folder(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM image series directly in ``folder`` (not its subfolders)."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader
    found = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if not files:
            continue
        try:
            first = _header(files[0])
        except RuntimeError:
            continue
        found.append(DicomSeries(folder, uid, files, _tag(first, TAG_MODALITY).upper(),
                                 _tag(first, TAG_STUDY_UID), _tag(first, TAG_SERIES_DESCRIPTION)))
    return found


def one_series(folder: str | os.PathLike) -> DicomSeries:
    """The single DICOM series in ``folder``; a clear error when there is none or several."""
    folder = Path(folder)
    series = series_in_folder(folder)
    if not series:
        raise UNetSegError(f"No DICOM series found in folder '{folder}'. Point to a folder that holds "
                           "the slices of one series, or to a NIfTI/NRRD/MHA file.")
    if len(series) > 1:
        raise UNetSegError(f"Folder '{folder}' holds {len(series)} DICOM series; put one series "
                           "per folder (or convert it to NIfTI) and try again.")
    return series[0]


# DICOM Modality (0008,0060) values that say what kind of scan a series is, as model metadata names them
SCAN_MODALITIES = {"CT", "MR", "PT", "US"}


def check_modality(folder: str | os.PathLike, model_modality: str, model_id: str) -> None:
    """Refuse a DICOM series whose Modality names another kind of scan than the model's (an MR series
    for a CT model). Series without a Modality, or with one that names no scan kind (OT, SC), and
    models of modality 'other' are left to the intensity check (``checks.modality_warnings``)."""
    series = one_series(folder)
    if model_modality in SCAN_MODALITIES and series.modality in SCAN_MODALITIES and \
            series.modality != model_modality:
        raise UNetSegError(f"The DICOM series in '{series.folder}' is {series.modality} (its Modality "
                           f"attribute), but model '{model_id}' segments {model_modality} scans; give a "
                           f"{model_modality} series, or choose a model for {series.modality}.")


def read_series(series: DicomSeries) -> sitk.Image:
    """The series as one volume, after its slice geometry has been checked."""
    check_slice_geometry(series.files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        return reader.Execute()
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise UNetSegError(f"Could not read the DICOM series in '{series.folder}' ({last}).") from None
