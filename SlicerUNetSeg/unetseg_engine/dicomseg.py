"""DICOM Segmentation objects (SEG IOD) written with highdicom, for PACS and other DICOM viewers.

The SEG references its source series and every source instance (each frame names the CT slice it was
drawn on), copies patient and study from the source, and carries per segment the model's label name,
SNOMED CT category and type codes (with the type modifier, and the anatomic region when the model
gives one), a recommended display colour (CIELab, from the model's RGB), and the algorithm: the model
id and version, algorithm type AUTOMATIC, or SEMIAUTOMATIC for a segment a person has corrected
(``algorithm_types``; the Slicer module tags edited segments so when a review is finished).

Every model label becomes a segment, found or not, as in our ``.seg.nrrd``: segment number n is the
model's n-th label in every SEG this model writes, so scripts over many studies can rely on it, and an
empty segment says the model looked for that structure and found none. Empty frames are not stored
(``omit_empty_frames``), so an empty segment costs a few header lines; dcmqi reads it back as an empty
mask and dciodvfy accepts it (both checked in the tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .dicomseries import DicomSeries
from .errors import UNetSegError
from .outputs import atomic_write

MANUFACTURER = "SlicerUNetSeg"
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC")  # MANUAL would need no algorithm: not ours to write
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                 "FrameOfReferenceUID")


def _dicom_modules():
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise UNetSegError("DICOM SEG output needs the highdicom and pydicom packages: "
                           "pip install highdicom (or write .seg.nrrd or .nii.gz instead).") from None
    return highdicom, pydicom


def read_source_headers(series: DicomSeries) -> list[Any]:
    """The source slices' headers (no pixel data), in the series' slice order; refuses series a SEG
    could not reference (anonymised without UIDs)."""
    _, pydicom = _dicom_modules()
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    for name in REQUIRED_UIDS:
        missing = [Path(f).name for f, ds in zip(series.files, datasets) if not str(ds.get(name, ""))]
        if missing:
            raise UNetSegError(f"The DICOM series in '{series.folder}' has no {name} in "
                               f"'{missing[0]}' ({len(missing)} file(s)); a DICOM SEG must reference "
                               "its source by UIDs. Write .seg.nrrd or .nii.gz for this series.")
    return datasets


def _code(highdicom, entry: dict[str, str]):
    return highdicom.sr.CodedConcept(value=entry["code"], scheme_designator=entry["scheme"],
                                     meaning=entry["meaning"])


def _generic_terminology() -> dict[str, dict[str, str]]:
    # SNOMED CT "Tissue" / "Tissue": what Slicer uses for a segment nobody has coded
    tissue = {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"}
    return {"category": tissue, "type": tissue}


def segment_description(highdicom, number: int, label: dict[str, Any], model: dict[str, Any],
                        algorithm_type: str = "AUTOMATIC"):
    """One ``SegmentDescription`` from a model label (name, codes, colour) and the model's identity;
    ``algorithm_type`` AUTOMATIC (the model's output as it is) or SEMIAUTOMATIC (corrected by hand)."""
    if algorithm_type not in ALGORITHM_TYPES:
        raise UNetSegError(f"Segment '{label['name']}': algorithm type '{algorithm_type}' is not one of "
                           f"{', '.join(ALGORITHM_TYPES)}.")
    term = label.get("terminology") or _generic_terminology()
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=model["id"][:64], version=str(model["version"])[:64],
        family=highdicom.sr.CodedConcept(value="123109", scheme_designator="DCM",
                                         meaning="Artificial Intelligence"),
        source=MANUFACTURER)
    regions = [_code(highdicom, term["region"])] if "region" in term else None
    description = highdicom.seg.SegmentDescription(
        segment_number=number, segment_label=label["name"][:64],
        segmented_property_category=_code(highdicom, term["category"]),
        segmented_property_type=_code(highdicom, term["type"]),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues[algorithm_type],
        algorithm_identification=algorithm, tracking_id=label["name"][:64],
        tracking_uid=highdicom.UID(), anatomic_regions=regions,
        display_color=highdicom.color.CIELabColor.from_rgb(*[int(c) for c in label["color"][:3]]))
    if "type_modifier" in term:  # DICOM nests the modifier inside the type code's item
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(highdicom, term["type_modifier"])]
    description.SegmentDescription = f"{model['id']} label {label['value']}"[:64]
    return description


def full_mask(masks, value: int, label_array: np.ndarray) -> np.ndarray:
    """Label ``value``'s mask on the whole grid, (k, j, i): from the multi-label ``masks`` (box,
    array) when given, else from the label map."""
    if masks is None:
        return label_array == value
    box, mask = masks[value]
    out = np.zeros(label_array.shape, bool)
    if mask.size:
        out[box.slices_kji()] = mask
    return out


def write_dicom_seg(path: str | Path, label_map: sitk.Image, labels: list[dict[str, Any]],
                    series: DicomSeries, model: dict[str, Any], masks=None,
                    datasets: list[Any] | None = None,
                    algorithm_types: dict[str, str] | None = None) -> list[str]:
    """Write a DICOM SEG atomically for ``label_map`` (on ``series``' grid, k in ``series.files``
    order); ``model`` is the model's metadata. ``algorithm_types`` maps label names to AUTOMATIC or
    SEMIAUTOMATIC (default AUTOMATIC). Returns the names of the labels with no voxels."""
    from . import __version__

    highdicom, _ = _dicom_modules()
    path = Path(path)
    datasets = datasets if datasets is not None else read_source_headers(series)
    label_array = sitk.GetArrayViewFromImage(label_map)
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if label_array.shape != (len(datasets), rows, columns):
        raise UNetSegError(f"The labels ({label_array.shape[::-1]}) are not on the grid of the DICOM "
                           f"series ({columns}, {rows}, {len(datasets)}); cannot write a DICOM SEG.")
    algorithm_types = dict(algorithm_types or {})
    unknown = sorted(set(algorithm_types) - {label["name"] for label in labels})
    if unknown:
        raise UNetSegError(f"Algorithm types given for {', '.join(unknown)}, which the model does not "
                           f"have (its labels: {', '.join(label['name'] for label in labels)}).")
    descriptions = [segment_description(highdicom, n + 1, label, model,
                                        algorithm_types.get(label["name"], "AUTOMATIC"))
                    for n, label in enumerate(labels)]
    values = [int(label["value"]) for label in labels]
    if masks is not None:  # multi-label masks may overlap: one binary plane per segment
        pixels = np.stack([full_mask(masks, v, label_array) for v in values], axis=-1)
    elif values == list(range(1, len(values) + 1)):  # label values already are segment numbers
        pixels = label_array
    else:
        lut = np.zeros(max(values) + 1, np.uint16 if len(values) > 255 else np.uint8)
        lut[values] = np.arange(1, len(values) + 1)
        pixels = lut[label_array]
    counts = pixels.reshape(-1, len(values)).sum(0) if pixels.ndim == 4 else \
        np.bincount(np.asarray(pixels).ravel(), minlength=len(values) + 1)[1:len(values) + 1]
    empty = [label["name"] for label, count in zip(labels, counts) if not count]
    source = datasets[0]
    seg = highdicom.seg.Segmentation(
        source_images=datasets, pixel_array=pixels,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=highdicom.UID(),
        series_number=int(source.get("SeriesNumber") or 0) + 1000, sop_instance_uid=highdicom.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="unetseg",
        software_versions=f"unetseg {__version__}", device_serial_number="0",
        content_label="UNETSEG", content_description=f"{model['title']}"[:64],
        series_description=f"{model['id']} segmentation"[:64], omit_empty_frames=True)
    seg.ContentCreatorName = ""  # type 2: present, empty (an algorithm, not a person, made it)
    atomic_write(path, lambda tmp: seg.save_as(tmp))
    return empty
