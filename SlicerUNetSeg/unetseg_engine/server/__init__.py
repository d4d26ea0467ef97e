"""``unetseg serve``: an inference server (FastAPI + uvicorn) for desktops without a GPU, and its client.

- ``app``: the HTTP interface, the token check and the command line entry (``serve_cli``).
- ``jobs``: jobs on disk, the queue and the warm workers (one ``Predictor`` per model per worker,
  the same step as ``unetseg segment``: ``pipeline.run_one``).
- ``uploads``: a volume streamed to disk under a size limit, unpacked (zipped DICOM) and checked with
  the engine's own readers before it becomes a job.
- ``client``: a small client on the standard library only (the Slicer panel uses it, so a Slicer
  without extra packages can talk to a server), used by the tests too.

Only ``client`` may be imported without FastAPI installed.
"""
