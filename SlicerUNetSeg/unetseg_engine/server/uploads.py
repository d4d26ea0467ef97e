"""An uploaded volume: streamed to disk under a size limit, unpacked, and checked before it is a job.

The body goes to ``STATE/uploads/<random>.part`` chunk by chunk (never held in memory); past the limit,
or when the client goes away, the partial file is removed. A complete upload is then checked with the
engine's own readers (``imageio.read_image``: header and data checks, a 3D single-channel scan, one
DICOM series with regular slices), and only then moved into a job folder. A refused upload leaves
nothing behind.

A zipped DICOM series is unpacked with names of our own (``0001.dcm``, ...), so no member name can
point outside the folder, and with limits on the number of members and on the bytes unpacked (a
zip bomb is cut off while unpacking, whatever its header claims).
"""

from __future__ import annotations

import os
import secrets
import shutil
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import UNetSegError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
ZIP_SUFFIX = ".zip"
MAX_ZIP_MEMBERS = 5000
UNZIP_RATIO = 4  # a zipped series may unpack to this many times the upload limit (DICOM deflates ~2:1)
CHUNK = 1 << 20


class UploadRefused(UNetSegError):
    """An upload the server will not take; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def input_suffix(filename: str) -> str:
    """The kind of upload, from its name: a volume file's suffix or ``.zip`` (a DICOM series)."""
    lower = filename.lower()
    for suffix in (*VOLUME_SUFFIXES, ZIP_SUFFIX):
        if lower.endswith(suffix):
            return suffix
    raise UploadRefused(415, f"Unsupported upload '{filename}': send a NIfTI (.nii.gz, .nii), NRRD "
                             "(.nrrd) or MetaImage (.mha) volume, or a DICOM series zipped (.zip).")


async def receive(chunks: AsyncIterator[bytes], folder: Path, max_bytes: int) -> Path:
    """Stream ``chunks`` into a new file in ``folder``; the file is removed on any failure."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(8)}.part"
    size = 0
    try:
        with open(path, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadRefused(413, f"The upload is larger than this server's limit of "
                                             f"{max_bytes / 1e6:.0f} MB; crop the scan or ask the server's "
                                             "administrator to raise --max-upload-mb.")
                out.write(chunk)
        if size == 0:
            raise UploadRefused(400, "The upload is empty; send the scan's file in the request body.")
    except BaseException:  # refused, or the client went away mid-upload (ClientDisconnect)
        path.unlink(missing_ok=True)
        raise
    return path


def unzip_series(archive: Path, folder: Path, max_bytes: int) -> None:
    """Unpack the files of a zipped DICOM series flat into ``folder`` under names of our own."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if not members:
                raise UploadRefused(400, "The zip file is empty; zip the folder of one DICOM series.")
            if len(members) > MAX_ZIP_MEMBERS:
                raise UploadRefused(413, f"The zip file holds {len(members)} files; at most "
                                         f"{MAX_ZIP_MEMBERS} slices are taken.")
            folder.mkdir(parents=True)
            left = max_bytes
            for index, member in enumerate(members):
                if member.flag_bits & 0x1:
                    raise UploadRefused(400, "The zip file is encrypted; zip the series without a password.")
                with zipped.open(member) as source, open(folder / f"{index + 1:05d}.dcm", "wb") as out:
                    while chunk := source.read(CHUNK):
                        left -= len(chunk)
                        if left < 0:
                            raise UploadRefused(413, f"The zipped series unpacks to more than "
                                                     f"{max_bytes / 1e6:.0f} MB; this server does not "
                                                     "take it.")
                        out.write(chunk)
    except zipfile.BadZipFile as error:
        raise UploadRefused(400, f"The upload is not a readable zip file ({error}); zip the folder of "
                                 "one DICOM series.") from None
    except (zipfile.LargeZipFile, NotImplementedError, EOFError) as error:
        raise UploadRefused(400, f"The zip file cannot be unpacked ({error}).") from None


def accept(part: Path, filename: str, job_folder: Path, max_bytes: int, *, needs_dicom: bool) -> str:
    """Check a complete upload and move it into ``job_folder``; returns its path there.

    On any refusal ``job_folder`` and ``part`` are removed: nothing is left behind.
    """
    from ..imageio import read_image
    from ..pipeline import dicom_source

    suffix = input_suffix(filename)
    try:
        inputs = job_folder / "input"
        inputs.mkdir(parents=True)
        if suffix == ZIP_SUFFIX:
            relative = "input/dicom"
            unzip_series(part, job_folder / relative, max_bytes * UNZIP_RATIO)
            part.unlink()
        else:
            relative = f"input/scan{suffix}"
            os.replace(part, job_folder / relative)
        if needs_dicom and suffix != ZIP_SUFFIX:
            raise UploadRefused(400, f"DICOM SEG output needs a DICOM series as input; '{filename}' is a "
                                     "volume file. Ask for seg.nrrd or nii.gz, or send the zipped series.")
        try:
            read_image(job_folder / relative, "upload")
            if needs_dicom:
                dicom_source(job_folder / relative)
        except UploadRefused:
            raise
        except UNetSegError as error:
            raise UploadRefused(400, str(error).replace(str(job_folder / relative), filename)) from None
        return relative
    except BaseException:
        part.unlink(missing_ok=True)
        shutil.rmtree(job_folder, ignore_errors=True)
        raise
