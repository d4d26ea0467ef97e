"""Writing outputs: checked before the slow work, written to a temporary file, verified, then renamed.

An output is never one of the inputs, never lands half-written under its own name, and a write that
fails (a full disk, a read-only folder) becomes one ``UNetSegError`` line instead of a traceback.
Verification matters because ITK's NIfTI writer does not report a full disk: it leaves a short or
empty file and returns as if all was well.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UNetSegError

LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
SEG_EXTENSION = ".seg.nrrd"


class _Incomplete(Exception):
    """What we read back from a just-written file is not what we wrote."""


def check_output_path(path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (),
                      dicom_seg: bool = False, any_name: bool = False) -> Path:
    """Check, before any slow work, that ``path`` can be written and would not replace an input.

    ``dicom_seg``: a DICOM SEG output, whose name (``.dcm`` or any) the caller has checked;
    ``any_name``: another kind of file (a JSON report), whose name the caller has checked."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".mhd", ".raw")):
        # a header plus a separate data file cannot be renamed into place as one, so a failed or
        # interrupted run would leave a header pointing at the wrong data; .mha is the same format
        raise UNetSegError(f"Output '{path.name}': .mhd (a header with a separate .raw file) is not "
                           "supported; use .mha, the same MetaImage format in one file.")
    if not (dicom_seg or any_name) and not (name.endswith(SEG_EXTENSION) or name.endswith(LABEL_EXTENSIONS)):
        raise UNetSegError(f"Unsupported output '{path.name}': use .nii.gz, .nrrd or .mha for a label "
                           f"map, or {SEG_EXTENSION} for a Slicer segmentation.")
    if not path.parent.exists():
        raise UNetSegError(f"The output folder '{path.parent}' does not exist; create it first.")
    if not path.parent.is_dir():
        raise UNetSegError(f"'{path.parent}' is not a folder.")
    if path.is_dir():
        raise UNetSegError(f"The output '{path}' is a folder; give a file name such as "
                           f"'{path / 'labels.nii.gz'}'.")
    for scan in inputs:
        _check_not_input(path, Path(scan))
    try:  # as root, os.access says yes even on a read-only mount: try it
        os.remove(_create_temp(path))
    except OSError as error:
        raise UNetSegError(f"Cannot write in the output folder '{path.parent}' "
                           f"({error.strerror}); choose a folder you can write to.") from None
    return path


def _same_file(a: Path, b: Path) -> bool:
    """The same file, also through another spelling, a symlink or a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _check_not_input(output: Path, scan: Path) -> None:
    if _same_file(output, scan):
        raise UNetSegError(f"The output '{output}' is the input '{scan}': writing it would replace "
                           "the scan with its labels. Choose another output name.")
    if not (scan.is_dir() and output.exists()):
        return
    # a new file inside a DICOM folder is fine (GDCM skips non-DICOM files), one of its slices is not;
    # listing the folder is cheap, scanning the series only happens when the output is one of its files
    if not any(_same_file(output, Path(entry.path)) for entry in os.scandir(scan) if entry.is_file()):
        return
    from .imageio import dicom_series_files

    try:
        series = dicom_series_files(scan)
    except UNetSegError:  # no single series there: reading the input will say so
        return
    if any(_same_file(output, Path(file)) for file in series):
        raise UNetSegError(f"The output '{output}' is one of the files of the DICOM series in "
                           f"'{scan}'; writing it would destroy a slice. Choose another output name.")


def _create_temp(path: Path) -> str:
    """An empty file next to ``path`` with the permissions the umask gives new files.

    (``tempfile.mkstemp`` makes them 0600, which the rename would pass on to the output.)
    """
    suffix = "".join(path.suffixes) or ".tmp"
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def atomic_write(path: Path, write: Callable[[str], object],
                 verify: Callable[[str], None] | None = None) -> None:
    """Call ``write(tmp)`` for a temporary file next to ``path``, check it, then rename it into place.

    ``verify(tmp)`` raises ``_Incomplete`` when the file read back is not what was written. On any
    failure the temporary file is removed and ``path`` is left as it was.
    """
    try:
        tmp = _create_temp(path)
    except OSError as error:
        raise UNetSegError(f"Could not write '{path}': {_reason(error)}.") from None
    try:
        try:
            write(tmp)
            if os.path.getsize(tmp) == 0:
                raise _Incomplete("the file came out empty")
            if verify is not None:
                verify(tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError, _Incomplete) as error:
            raise UNetSegError(f"Could not write '{path}': {_reason(error)}. Nothing was written; "
                               "check the free space on that disk.") from None
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def verify_image_file(tmp: str, image: sitk.Image, layers: bool = False) -> None:
    """The header read back matches ``image``'s grid and, for NIfTI, every voxel is in the file.

    ``layers``: a .seg.nrrd may hold its segments in several layers, an extra leading axis.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(tmp)
    reader.ReadImageInformation()
    size = reader.GetSize()
    grid_ok = (size[-3:] if layers else size) == image.GetSize() and \
        np.allclose(reader.GetSpacing()[-3:], image.GetSpacing(), rtol=1e-5, atol=1e-4) and \
        np.allclose(reader.GetOrigin()[-3:], image.GetOrigin(), rtol=1e-5, atol=1e-3)
    if not layers and grid_ok:
        grid_ok = np.allclose(reader.GetDirection(), image.GetDirection(), atol=1e-3)
    if not grid_ok:
        raise _Incomplete("the file read back does not have the label map's size and geometry")
    if tmp.lower().endswith((".nii", ".nii.gz")):
        from .checks import nifti_header, scan_nifti_data

        header = nifti_header(Path(tmp))
        try:
            scan_nifti_data(Path(tmp), int(header["vox_offset"]), int(np.prod(header.get_data_shape())),
                            header.get_data_dtype(), "label map written")
        except UNetSegError as error:
            raise _Incomplete(str(error).split(";")[0]) from None


def write_label_map(label: sitk.Image, path: str | os.PathLike) -> None:
    """Write a label map atomically (compressed), verified before it takes the output's name."""
    path = check_output_path(path)
    atomic_write(path, lambda tmp: sitk.WriteImage(label, tmp, useCompression=True),
                 verify=partial(verify_image_file, image=label))
