"""The HTTP interface of ``unetseg serve`` (FastAPI), its token check, and the command line entry.

Every route but ``/health`` needs ``Authorization: Bearer <token>``; the token is compared in constant
time (``hmac.compare_digest``) and never logged or echoed. It comes from ``$UNETSEG_SERVER_TOKEN`` or
``--token-file``, never from the command line, where ``ps`` would show it to every user (``command``).

Routes (JSON unless said otherwise)::

    GET    /health                      {"ok": true} (no token: for load balancers and start-up checks)
    GET    /models                      the served models, the upload limit, the output types
    POST   /jobs?model=ID&filename=NAME&output=seg.nrrd|dicom-seg|nii.gz|nrrd
                                        body: the volume file, or a zipped DICOM series -> 201 the job
    GET    /jobs                        every job
    GET    /jobs/{id}                   status, stage, fraction, message, notes, timings
    POST   /jobs/{id}/cancel            stop it (queued: at once; running: within about one window)
    GET    /jobs/{id}/result            the result file; the job and its files are deleted once sent
    DELETE /jobs/{id}                   cancel and delete

Refusals: 401 (token), 404 (model or job), 409 (result not ready), 411/413 (size), 415 (file type),
400 (a file that is not a usable scan: the engine's own message), 503 (queue full). None leaves a job
or a file behind.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from .jobs import FINISHED, OUTPUTS, Job, JobStore, QueueFull
from .uploads import UploadRefused, accept, input_suffix, receive

SWEEP_S = 30.0


def create_app(store: JobStore, token: str, max_upload_bytes: int, on_ready=None) -> FastAPI:
    """The FastAPI application over ``store``; ``on_ready()`` runs once the workers are warm."""
    expected = token.encode("utf-8")

    def check_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise HTTPException(401, "Missing or wrong token: send 'Authorization: Bearer <token>' with "
                                     "the token the server was started with.",
                                headers={"WWW-Authenticate": "Bearer"})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(store.start_workers)  # loads every model: warm before the first job

        async def sweep() -> None:
            while True:
                await asyncio.sleep(min(SWEEP_S, max(store.keep_s / 4, 0.5)))
                await run_in_threadpool(store.expire)

        sweeper = asyncio.create_task(sweep())
        if on_ready:
            on_ready()
        yield
        sweeper.cancel()
        await run_in_threadpool(store.stop)

    app = FastAPI(title="unetseg server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    auth = [Depends(check_token)]

    def job_or_404(job_id: str, job: Job | None = None) -> Job:
        """``job`` (by default the store's job ``job_id``), or a 404 when there is none."""
        job = job or store.get(job_id)
        if job is None:
            raise HTTPException(404, f"No job '{job_id}' here: finished jobs are deleted once their result "
                                     f"is downloaded, or {store.keep_s / 60:g} minutes after they end.")
        return job

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.get("/models", dependencies=auth)
    def models() -> dict:
        """Summaries, and each model's metadata (labels, colours, terminology: what a client needs to
        name the segments), the upload limit, the output types, and the server's PyTorch and GPU."""
        from ..worker import environment_info

        return {"models": [package.summary() for package in store.models.values()],
                "metadata": {model_id: package.meta for model_id, package in store.models.items()},
                "max_upload_bytes": max_upload_bytes, "outputs": list(OUTPUTS),
                "environment": dict(environment_info(), workers=store.n_workers)}

    @app.post("/jobs", status_code=201, dependencies=auth)
    async def submit(request: Request, model: str, filename: str, output: str = "seg.nrrd") -> dict:
        # everything that can be refused without the body is refused before reading it
        if model not in store.models:
            raise HTTPException(404, f"Model '{model}' is not served here; this server has: "
                                     f"{', '.join(store.models)}.")
        if output not in OUTPUTS:
            raise HTTPException(400, f"Unknown output '{output}': use one of {', '.join(OUTPUTS)}.")
        try:
            input_suffix(filename)
            store.check_room()
        except UploadRefused as error:
            raise HTTPException(error.status, str(error)) from None
        except QueueFull as error:
            raise HTTPException(503, str(error)) from None
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload_bytes:
            raise HTTPException(413, f"The upload ({int(length) / 1e6:.0f} MB) is larger than this "
                                     f"server's limit of {max_upload_bytes / 1e6:.0f} MB.")
        try:
            part = await receive(request.stream(), store.root / "uploads", max_upload_bytes)
        except UploadRefused as error:
            raise HTTPException(error.status, str(error)) from None
        except ClientDisconnect:
            raise HTTPException(400, "The upload was interrupted.") from None
        job_id = store.new_job_id()
        try:
            relative = await run_in_threadpool(accept, part, filename, store.folder(job_id),
                                               max_upload_bytes, needs_dicom=output == "dicom-seg")
        except UploadRefused as error:
            raise HTTPException(error.status, str(error)) from None
        job = store.add(Job(id=job_id, model=model, output=output, input_name=Path(filename).name,
                            input_path=relative))
        return job.public()

    @app.get("/jobs", dependencies=auth)
    def list_jobs() -> dict:
        return {"jobs": [job.public() for job in store.list()]}

    @app.get("/jobs/{job_id}", dependencies=auth)
    def status(job_id: str) -> dict:
        return job_or_404(job_id).public()

    @app.post("/jobs/{job_id}/cancel", dependencies=auth)
    def cancel(job_id: str) -> dict:
        # the store's answer, not an earlier look-up: the job may be deleted in between
        return job_or_404(job_id, store.cancel(job_id)).public()

    @app.delete("/jobs/{job_id}", dependencies=auth)
    def delete(job_id: str) -> dict:
        job_or_404(job_id)
        store.delete(job_id)
        return {"deleted": job_id}

    @app.get("/jobs/{job_id}/result", dependencies=auth)
    def result(job_id: str):
        job = job_or_404(job_id)
        if job.status != "done":
            detail = f"Job '{job_id}' is {job.status}" + (f": {job.message}" if job.message else "") + \
                ("; wait until it is done." if job.status not in FINISHED else ".")
            raise HTTPException(409, detail)
        path = store.result_path(job)
        return FileResponse(path, filename=f"{Path(job.input_name).name.split('.')[0]}{path.name[6:]}",
                            media_type="application/octet-stream",
                            background=BackgroundTask(store.delete, job_id))

    return app
