"""Reading input volumes (NIfTI/NRRD/MHA files, DICOM folders), checked before and after reading.

The checks themselves live in ``checks``; writing outputs lives in ``outputs``.

Volumes travel through the engine as ``SimpleITK.Image`` objects: they carry spacing, origin and
direction (LPS, ITK's convention), so geometry is never lost between stages. Arrays taken from them are
in (k, j, i) = (z, y, x) order, the same as Slicer's ``arrayFromVolume``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checks import check_file_contents, check_regular_file, check_volume
from .errors import UNetSegError


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


def dicom_series_files(folder: Path) -> tuple[str, ...]:
    """The files of the one DICOM series in ``folder``, in slice order (a clear error for none or
    several)."""
    from .dicomseries import one_series

    return tuple(one_series(folder).files)


def _read_dicom_series(folder: Path) -> sitk.Image:
    from .dicomseries import check_slice_geometry

    files = dicom_series_files(folder)
    check_slice_geometry(files)  # refuses missing slices and varying spacing (the reader would stretch)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(path: str | os.PathLike, what: str = "input") -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a folder with one DICOM series, and check it is a usable 3D scan.

    The file is checked before ITK reads it (``checks.check_file_contents``), because ITK's readers
    block, zero-fill or allocate without bound on files that do not match their header.
    """
    path = Path(path)
    if not path.exists():
        raise UNetSegError(f"The {what} '{path}' does not exist. Check the path.")
    check_regular_file(path, what)
    check_file_contents(path, f"{what} '{path.name}'")
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
