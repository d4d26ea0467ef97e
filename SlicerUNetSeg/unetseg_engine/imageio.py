"""Reading and checking input volumes, and writing label maps without leaving half-written files.

Volumes travel through the engine as ``SimpleITK.Image`` objects: they carry spacing, origin and
direction (LPS, ITK's convention), so geometry is never lost between stages. Arrays taken from them are
in (k, j, i) = (z, y, x) order, the same as Slicer's ``arrayFromVolume``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UNetSegError

LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEG_EXTENSION = ".seg.nrrd"


def image_from_array(array_kji: np.ndarray, spacing_xyz, origin_lps, direction_lps) -> sitk.Image:
    """Build a SimpleITK image from a (k, j, i) array and explicit LPS geometry.

    ``direction_lps`` is a 3x3 matrix (or 9 numbers, row-major) whose columns are the i, j, k axis
    directions in LPS. The Slicer side converts IJK-to-RAS to this by negating the first two rows.
    """
    image = sitk.GetImageFromArray(np.asarray(array_kji), isVector=False)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin_lps])
    image.SetDirection([float(d) for d in np.asarray(direction_lps, dtype=float).ravel()])
    return image


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise UNetSegError(f"No DICOM series found in folder '{folder}'. Point to a folder that holds "
                           "the slices of one series, or to a NIfTI/NRRD/MHA file.")
    if len(series_ids) > 1:
        raise UNetSegError(f"Folder '{folder}' holds {len(series_ids)} DICOM series; put one series "
                           "per folder (or convert it to NIfTI) and try again.")
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    from .dicomseries import check_slice_geometry

    check_slice_geometry(files)  # refuses missing slices and varying spacing (the reader would stretch)
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(path: str | os.PathLike, what: str = "input") -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a folder with one DICOM series, and check it is a usable 3D scan."""
    path = Path(path)
    if not path.exists():
        raise UNetSegError(f"The {what} '{path}' does not exist. Check the path.")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except UNetSegError:
        raise
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise UNetSegError(f"Could not read the {what} '{path}' ({first}). Give a NIfTI, NRRD or MHA "
                           "file, or a folder holding one DICOM series.") from None
    check_volume(image, f"{what} '{path.name}'")
    return image


def check_volume(image: sitk.Image, what: str = "input volume") -> None:
    """Refuse images the engine cannot segment, with a message that says what to do."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UNetSegError(f"The {what} has {image.GetNumberOfComponentsPerPixel()} components per "
                           "voxel (a colour or vector image); give a single-channel scan.")
    dim = image.GetDimension()
    if dim == 4:
        raise UNetSegError(f"The {what} is 4D (size {image.GetSize()}); give one 3D scan (extract one "
                           "time point or channel first).")
    if dim == 2:
        raise UNetSegError(f"The {what} is a 2D image (size {image.GetSize()}); the models need a 3D "
                           "volume with several slices.")
    if dim != 3:
        raise UNetSegError(f"The {what} has {dim} dimensions; give a 3D volume.")
    size = image.GetSize()
    if min(size) == 0:
        raise UNetSegError(f"The {what} is empty (size {size}).")
    if sorted(size)[0] < 2:
        raise UNetSegError(f"The {what} has a single slice (size {size}); it is a 2D image. Give a 3D "
                           "volume with several slices.")
    view = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(view.dtype, np.floating) and not np.isfinite(view).all():
        raise UNetSegError(f"The {what} contains NaN or infinite voxel values; fix or mask them and "
                           "try again.")
    if view.min() == view.max():
        raise UNetSegError(f"The {what} is empty: every voxel has the value {view.flat[0]}. "
                           "Check that the right file was given.")


def check_output_path(path: str | os.PathLike) -> Path:
    """Check that the output path has a supported extension and an existing folder."""
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(SEG_EXTENSION) or name.endswith(LABEL_EXTENSIONS)):
        raise UNetSegError(f"Unsupported output '{path.name}': use .nii.gz, .nrrd or .mha for a label "
                           f"map, or {SEG_EXTENSION} for a Slicer segmentation.")
    if not path.parent.exists():
        raise UNetSegError(f"The output folder '{path.parent}' does not exist; create it first.")
    if not path.parent.is_dir():
        raise UNetSegError(f"'{path.parent}' is not a folder.")
    return path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it into place."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_label_map(label: sitk.Image, path: str | os.PathLike) -> None:
    """Write a label map atomically (compressed)."""
    path = check_output_path(path)
    atomic_write(path, lambda tmp: sitk.WriteImage(label, tmp, useCompression=True))


def grid_differences(a, b) -> list[str]:
    """How the voxel grids of ``a`` and ``b`` differ (empty when they are the same grid).

    Takes ``sitk.Image`` or ``sitk.ImageFileReader`` (after ``ReadImageInformation``, so nothing but
    the header is read). Float headers round, so spacing may differ by 0.1 %, origin by a hundredth of
    a voxel and direction cosines by 1e-4; beyond that, comparing voxel by voxel compares different
    places in the patient.
    """
    problems = []
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        return [f"size {tuple(a.GetSize())} vs {tuple(b.GetSize())}"]
    spacing_a, spacing_b = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(spacing_a, spacing_b, rtol=1e-3, atol=0):
        problems.append(f"spacing {_fmt(spacing_a)} vs {_fmt(spacing_b)} mm")
    if np.abs(np.subtract(a.GetOrigin(), b.GetOrigin())).max() > 0.01 * spacing_a.min():
        problems.append(f"origin {_fmt(a.GetOrigin())} vs {_fmt(b.GetOrigin())} mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        problems.append(f"direction {_fmt(a.GetDirection())} vs {_fmt(b.GetDirection())}")
    return problems


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
