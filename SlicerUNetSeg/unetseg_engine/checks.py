"""Checks on what the user hands the engine: input files, volumes and run settings.

The readers accept much that they should not (found by fuzzing, issue 19): ITK blocks forever on a
named pipe, zero-fills a truncated NIfTI, reads NaNs in a NIfTI as 0, and allocates whatever a header
claims before noticing the file is 2 KB. So a file is checked before it is read, from its header and
its size, and (for NIfTI) by streaming through its data once; nothing here holds the volume in memory.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .errors import UNetSegError

if TYPE_CHECKING:
    from nibabel.nifti1 import Nifti1Header

# deflate (gzip) cannot compress better than about 1032:1, so a .gz file holds at most this many bytes
# of data per byte of file; a header claiming more describes data that is not there
MAX_DEFLATE_RATIO = 1032
# how far the direction matrix may be from orthonormal (DICOM stores cosines with about 6 digits and
# NIfTI as a float32 quaternion, both far inside this); beyond it the axes are sheared or scaled
ORTHONORMAL_TOLERANCE = 1e-3
CHUNK_BYTES = 1 << 24
# besides the voxels as read, preprocessing holds about one float32 copy of the scan
WORKING_BYTES_PER_VOXEL = 4
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _megabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB" \
        if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} KB"


def _dims(size) -> str:
    return "x".join(str(int(n)) for n in size)


def available_memory() -> int:
    """Bytes of memory the system can give this process now (psutil's estimate)."""
    import psutil

    return int(psutil.virtual_memory().available)


# ---- files ---------------------------------------------------------------------------------------
def check_regular_file(path: Path, what: str) -> None:
    """Refuse named pipes, devices and sockets: readers block on them or read forever."""
    mode = os.stat(path).st_mode  # follows symlinks: a link to /dev/zero is /dev/zero
    if stat.S_ISDIR(mode):
        for entry in os.scandir(path):  # GDCM opens every file of a DICOM folder
            if not entry.is_dir() and not entry.is_file():
                raise UNetSegError(f"The {what} '{path}' holds '{entry.name}', which is not a regular "
                                   "file (a named pipe, device or socket); remove it from the folder.")
    elif not stat.S_ISREG(mode):
        raise UNetSegError(f"The {what} '{path}' is not a regular file (a named pipe, device or "
                           "socket); give a NIfTI, NRRD or MHA file, or a DICOM folder.")


def check_file_contents(path: Path, what: str) -> None:
    """Before reading: the file must hold the data its header claims, and that data must fit in memory.

    Files whose header cannot be parsed are left to ITK's reader, which says it cannot read them.
    """
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        _check_nifti(path, what)
    elif not path.is_dir():
        _check_itk_header(path, what)


def _check_size(what: str, size, dtype_name: str, item_bytes: int, file_bytes: int,
                data_bytes_at_most: float | None) -> None:
    """Refuse a header that claims more data than the file can hold, or than memory can take."""
    n_voxels = math.prod(int(n) for n in size)
    data_bytes = n_voxels * item_bytes
    claim = f"{_dims(size)} {dtype_name} voxels ({_megabytes(data_bytes)})"
    if data_bytes_at_most is not None and data_bytes > data_bytes_at_most:
        raise UNetSegError(f"The {what} cannot hold what its header claims: {claim} in a file of "
                           f"{_megabytes(file_bytes)}. The file is truncated or its header is wrong; "
                           "export it again.")
    need = n_voxels * (item_bytes + WORKING_BYTES_PER_VOXEL)
    free = available_memory()
    if need > free:
        raise UNetSegError(f"The {what} is too large for the memory of this computer: {claim} need "
                           f"about {_megabytes(need)} to read and prepare, {_megabytes(free)} is "
                           "available. Crop or downsample it, or close other programs.")


def nifti_header(path: Path) -> Nifti1Header:
    """The header of a NIfTI-1 or NIfTI-2 file (nibabel's ``Nifti1Header``; ``Nifti2Header`` is one)."""
    import nibabel as nib

    header = nib.load(str(path)).header
    if not isinstance(header, nib.Nifti1Header):
        raise UNetSegError(f"'{path.name}' is not a NIfTI file.")
    return header


def _check_nifti(path: Path, what: str) -> None:
    try:
        header = nifti_header(path)
        size, dtype = header.get_data_shape(), header.get_data_dtype()
        offset = int(header["vox_offset"])
    except Exception:  # not a NIfTI nibabel can parse: ITK's reader will say what is wrong
        return
    compressed = path.name.lower().endswith(".gz")
    file_bytes = path.stat().st_size
    at_most = file_bytes * MAX_DEFLATE_RATIO if compressed else file_bytes - offset
    _check_size(what, size, str(dtype), dtype.itemsize, file_bytes, at_most)
    if compressed or np.issubdtype(dtype, np.floating):
        scan_nifti_data(path, offset, math.prod(size), dtype, what)


def scan_nifti_data(path: Path, offset: int, n_voxels: int, dtype: np.dtype, what: str) -> None:
    """Stream through a NIfTI's voxels once: all there (gzip stream complete), and finite if floats.

    ITK zero-fills missing voxels and reads NaN and infinity as 0, so neither can be seen afterwards.
    Also used to check a NIfTI we wrote, because ITK's NIfTI writer does not report a full disk.
    """
    expected = n_voxels * dtype.itemsize
    floating = np.issubdtype(dtype, np.floating)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    got, rest = 0, b""
    try:
        with opener(path, "rb") as stream:
            stream.seek(offset)
            while got < expected:
                block = stream.read(min(CHUNK_BYTES, expected - got))
                if not block:
                    break
                got += len(block)
                if floating:
                    data = rest + block
                    usable = len(data) - len(data) % dtype.itemsize
                    if not np.isfinite(np.frombuffer(data[:usable], dtype)).all():
                        raise UNetSegError(f"The {what} contains NaN or infinite voxel values; fix "
                                           "or mask them and try again.")
                    rest = data[usable:]
            while stream.read(CHUNK_BYTES):  # to the end of the gzip stream, which checks its CRC
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise UNetSegError(f"The {what} is truncated or damaged ({error}); export it again.") from None
    if got < expected:
        raise UNetSegError(f"The {what} is truncated: its header describes {_megabytes(expected)} of "
                           f"voxels, the file holds {_megabytes(got)}. Export it again.")


def _check_itk_header(path: Path, what: str) -> None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # ITK's reader will say what is wrong
        return
    components = reader.GetNumberOfComponents()
    item_bytes = sitk.Image([1, 1], reader.GetPixelID(), components).GetSizeOfPixelComponent() \
        * components
    file_bytes = path.stat().st_size
    encoding = _local_encoding(path)
    at_most = {"raw": file_bytes, "gzip": file_bytes * MAX_DEFLATE_RATIO}.get(encoding or "")
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    _check_size(what, reader.GetSize(), pixel_type, item_bytes, file_bytes, at_most)


def _local_encoding(path: Path) -> str | None:
    """'raw' or 'gzip' for an NRRD or MetaImage file that holds its own data; None when unsure."""
    name = path.name.lower()
    with open(path, "rb") as stream:
        head = stream.read(65536).decode("latin-1")
    if name.endswith(".nrrd"):
        fields = dict(line.split(":", 1) for line in head.split("\n\n")[0].splitlines() if ": " in line)
        fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
        if "data file" in fields or "datafile" in fields:
            return None
        return {"raw": "raw", "gzip": "gzip", "gz": "gzip"}.get(fields.get("encoding", ""))
    if name.endswith(".mha"):
        fields = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
        fields = {k.strip().lower(): v.strip().lower() for k, v in fields.items()}
        if fields.get("elementdatafile") != "local":
            return None
        return "gzip" if fields.get("compresseddata") == "true" else "raw"
    return None


# ---- volumes -------------------------------------------------------------------------------------
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
    check_direction(image, what)
    view = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(view.dtype, np.floating) and not np.isfinite(view).all():
        raise UNetSegError(f"The {what} contains NaN or infinite voxel values; fix or mask them and "
                           "try again.")
    if view.min() == view.max():
        raise UNetSegError(f"The {what} is empty: every voxel has the value {view.flat[0]}. "
                           "Check that the right file was given.")


def check_direction(image: sitk.Image, what: str) -> None:
    """Refuse sheared or scaled axes: resampling assumes a rotation, and NIfTI output would coerce it.

    Directions within ``ORTHONORMAL_TOLERANCE`` of orthonormal are accepted as they are.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    error = np.abs(direction.T @ direction - np.eye(3)).max()
    if error > ORTHONORMAL_TOLERANCE:
        raise UNetSegError(f"The {what} has a direction matrix that is not orthonormal (its axes are "
                           f"sheared or not unit length; off by {error:.3g}, tolerance "
                           f"{ORTHONORMAL_TOLERANCE:g}). Resample it onto an orthogonal grid first.")


def modality_warnings(images: list[sitk.Image], modality: str) -> list[str]:
    """Warnings (not errors) when a scan does not look like the model's modality.

    A CT in Hounsfield units has air near -1000 around and inside the body; an MR has no such values.
    A model applied to the other modality returns confident nonsense, so the user should hear of it.
    """
    warnings = []
    for index, image in enumerate(images):
        view = sitk.GetArrayViewFromImage(image)
        stride = max(1, round((view.size / 1e6) ** (1 / 3)))
        low = float(np.percentile(view[::stride, ::stride, ::stride], 0.5))
        which = f"input {index + 1}" if len(images) > 1 else "input"
        if modality == "CT" and low > -500:
            warnings.append(f"the {which} does not look like a CT in Hounsfield units (its lowest "
                            f"values are near {low:g}, a CT has air near -1000); the model expects a CT, "
                            "so the result may be meaningless.")
        elif modality == "MR" and low <= -500:
            warnings.append(f"the {which} looks like a CT (values near {low:g}, as air in Hounsfield "
                            "units); the model expects an MR, so the result may be meaningless.")
    return warnings


# ---- devices -------------------------------------------------------------------------------------
# Where the network may be asked to run (the command line's --device, the panel's combo box, the
# worker's requests): "auto" is CUDA when PyTorch sees a GPU, else the CPU.
DEVICES = ("auto", "cuda", "cpu")


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise UNetSegError(f"Unknown device '{device}': use 'auto', 'cuda' (GPU) or 'cpu'.")


# ---- run settings --------------------------------------------------------------------------------
MAX_OVERLAP = 0.95


def check_settings(window: tuple[float, float] | None = None, overlap: float | None = None,
                   sw_batch_size: int | None = None) -> None:
    """Refuse run settings that would silently give nothing (a NaN window) or fail deep inside."""
    if window is not None:
        level, width = window
        if not (math.isfinite(level) and math.isfinite(width)):
            raise UNetSegError(f"The window level and width must be finite numbers, not {level:g},"
                               f"{width:g}.")
        if width <= 0:
            raise UNetSegError(f"The window width must be positive, not {width:g}.")
    if overlap is not None and not (math.isfinite(overlap) and 0 <= overlap <= MAX_OVERLAP):
        raise UNetSegError(f"The sliding-window overlap must be between 0 and {MAX_OVERLAP:g}, not "
                           f"{overlap:g} (more overlap multiplies the time for nothing).")
    if sw_batch_size is not None and sw_batch_size < 1:
        raise UNetSegError(f"The window batch size (--sw-batch-size) must be 1 or more, not "
                           f"{sw_batch_size}.")
