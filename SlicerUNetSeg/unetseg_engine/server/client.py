"""A client of ``unetseg serve`` on the standard library only (Slicer's Python has no httpx).

    client = ServerClient("http://gpu-box:8765", token)
    job = client.submit("ct.nii.gz", model="openkbp-hn-oar")      # or a DICOM series folder
    client.wait(job["id"], progress=lambda stage, fraction: ...)
    client.download(job["id"], "ct.seg.nrrd")

Every failure is a ``ServerError`` (a ``UNetSegError``) whose message says what happened and what to
do: the server's own refusal (with its HTTP status), or that the server cannot be reached.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CancelledError, UNetSegError

CHUNK = 1 << 20


class ServerError(UNetSegError):
    """The server refused a request (``status`` is its HTTP status) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def zip_series(folder: Path, archive: Path) -> None:
    """Zip the files of a DICOM series folder (not its subfolders), as the server takes them."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise UNetSegError(f"The folder '{folder}' holds no files; give the folder of one DICOM series.")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zipped:
        for path in files:
            zipped.write(path, path.name)


class ServerClient:
    """Talks to one server; one object may be used from one thread at a time."""

    def __init__(self, url: str, token: str, timeout_s: float = 60.0) -> None:
        url = url.strip().rstrip("/")
        if urllib.parse.urlparse(url).scheme not in ("http", "https"):
            raise UNetSegError(f"The server address '{url}' must start with http:// or https://.")
        if not token:
            raise UNetSegError("No token for the server: ask its administrator for one.")
        self.url, self.timeout_s = url, timeout_s
        self._headers = {"Authorization": f"Bearer {token}"}

    # ---- requests -----------------------------------------------------------------------------------
    def _open(self, method: str, path: str, body=None, headers: dict[str, str] | None = None):
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method,
                                         headers={**self._headers, **(headers or {})})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read().decode("utf-8")).get("detail", "")
            except (ValueError, OSError, AttributeError):
                detail = ""
            raise ServerError(f"The server refused: {detail or error.reason} (HTTP {error.code}).",
                              error.code) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise ServerError(f"Cannot reach the server at {self.url} ({reason}). Check the address, and "
                              "that 'unetseg serve' runs there.") from None

    def _json(self, method: str, path: str, body=None, headers=None) -> dict[str, Any]:
        with self._open(method, path, body, headers) as response:
            return json.loads(response.read().decode("utf-8"))

    def models(self) -> dict[str, Any]:
        """The served models (``summary()`` of each), ``max_upload_bytes`` and the output types."""
        return self._json("GET", "/models")

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{urllib.parse.quote(job_id)}")

    def jobs(self) -> list[dict[str, Any]]:
        return self._json("GET", "/jobs")["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/jobs/{urllib.parse.quote(job_id)}/cancel")

    def delete(self, job_id: str) -> None:
        self._json("DELETE", f"/jobs/{urllib.parse.quote(job_id)}")

    # ---- the three steps ------------------------------------------------------------------------------
    def submit(self, scan: str | os.PathLike, model: str, output: str = "seg.nrrd") -> dict[str, Any]:
        """Upload a volume file or a DICOM series folder (zipped on the way); returns the new job."""
        scan = Path(scan)
        if not scan.exists():
            raise UNetSegError(f"The scan '{scan}' does not exist.")
        with tempfile.TemporaryDirectory(prefix="unetseg-upload-") as tmp:
            if scan.is_dir():
                upload, name = Path(tmp) / "series.zip", f"{scan.name or 'series'}.zip"
                zip_series(scan, upload)
            else:
                upload, name = scan, scan.name
            limit = self.models()["max_upload_bytes"]
            if upload.stat().st_size > limit:  # the server would refuse it too, after the first bytes
                raise ServerError(f"'{scan.name}' is {upload.stat().st_size / 1e6:.0f} MB; the server takes "
                                  f"at most {limit / 1e6:.0f} MB. Crop the scan first.", 413)
            query = urllib.parse.urlencode({"model": model, "filename": name, "output": output})
            with open(upload, "rb") as body:
                return self._json("POST", f"/jobs?{query}", body,
                                  {"Content-Type": "application/octet-stream",
                                   "Content-Length": str(upload.stat().st_size)})

    def wait(self, job_id: str, progress: Callable[[str, float], None] | None = None,
             cancel: Callable[[], bool] | None = None, poll_s: float = 0.25,
             timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job ends; returns its status when done. Raises ``ServerError`` when it failed
        or the server went away, ``CancelledError`` when it was cancelled (also by ``cancel()``)."""
        start, asked = time.monotonic(), False
        while True:
            try:
                job = self.status(job_id)
            except ServerError as error:
                if error.status == 0:
                    raise ServerError(f"The server at {self.url} stopped answering while job {job_id} was "
                                      f"{'running' if not asked else 'being cancelled'} ({error}). The "
                                      "server resumes its queued jobs when it restarts: wait, then check "
                                      "again, or submit the scan once more.") from None
                raise
            if progress:
                progress(job["stage"], float(job["fraction"]))
            if job["status"] == "done":
                return job
            if job["status"] == "failed":
                raise ServerError(f"The server could not segment the scan: {job['message']}", 422)
            if job["status"] == "cancelled":
                raise CancelledError(f"Segmentation was cancelled ({job['message']}).")
            if not asked and (cancel and cancel() or timeout_s is not None and
                              time.monotonic() - start > timeout_s):
                self.cancel(job_id)
                asked = True
            time.sleep(poll_s)

    def download(self, job_id: str, destination: str | os.PathLike) -> Path:
        """Save the result at ``destination`` (written under a temporary name, then renamed); the
        server deletes the job once it has sent it."""
        destination = Path(destination)
        if destination.is_dir():
            raise UNetSegError(f"'{destination}' is a folder; give a file name for the result.")
        tmp = destination.parent / f".{destination.name}.{secrets.token_hex(4)}.part"
        try:
            with self._open("GET", f"/jobs/{urllib.parse.quote(job_id)}/result") as response, \
                    open(tmp, "wb") as out:
                expected = response.headers.get("Content-Length")
                got = 0
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    got += len(chunk)
            if expected is not None and got != int(expected):
                raise ServerError(f"The result of job {job_id} arrived cut off ({got} of {expected} "
                                  "bytes).")
            os.replace(tmp, destination)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return destination

    def segment(self, scan, destination, model: str, output: str = "seg.nrrd", progress=None,
                cancel=None) -> Path:
        """Submit, wait and download in one call."""
        job = self.submit(scan, model, output)
        try:
            self.wait(job["id"], progress, cancel)
        except CancelledError:
            self.delete(job["id"])
            raise
        return self.download(job["id"], destination)
