"""``unetseg serve`` on the command line: its options, the token, binding the port, running uvicorn.

Kept apart from ``app`` so that ``unetseg`` itself never imports FastAPI.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..errors import UNetSegError
from ..runtimes import RUNTIME_CHOICES

TOKEN_ENV = "UNETSEG_SERVER_TOKEN"
MIN_TOKEN_CHARS = 16


def read_token(token_file: str | None) -> str:
    """The token from ``--token-file`` or ``$UNETSEG_SERVER_TOKEN``; refuses to go on without one."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text("utf-8").strip()
        except OSError as error:
            raise UNetSegError(f"Cannot read the token file '{path}' ({error.strerror}).") from None
        if os.name == "posix" and path.stat().st_mode & 0o077:
            print(f"unetseg: warning: the token file '{path}' can be read by other users; "
                  f"chmod 600 '{path}'.", file=sys.stderr)
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UNetSegError(f"The server needs a token: put one in a file and pass --token-file FILE, or "
                           f"set ${TOKEN_ENV}. Make one with: python -c \"import secrets; "
                           "print(secrets.token_urlsafe(32))\" > token.txt; chmod 600 token.txt")
    if len(token) < MIN_TOKEN_CHARS:
        raise UNetSegError(f"The token is too short ({len(token)} characters); use at least "
                           f"{MIN_TOKEN_CHARS} random characters (secrets.token_urlsafe(32) gives 43).")
    return token


def serve_cli(args) -> int:
    """``unetseg serve``: check everything, bind the port, then serve until Ctrl-C or SIGTERM."""
    import socket

    import uvicorn

    from ..modelpkg import get_model
    from .app import create_app
    from .jobs import JobStore

    token = read_token(args.token_file)
    if args.max_upload_mb <= 0:
        raise UNetSegError(f"--max-upload-mb must be positive, not {args.max_upload_mb:g}.")
    models = {}
    for name in args.models or [None]:
        package = get_model(name)
        if len(package.meta["inputs"]) != 1:
            raise UNetSegError(f"Model '{package.id}' takes {len(package.meta['inputs'])} input volumes; "
                               "the server serves single-input models only.")
        models[package.id] = package
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # partial uploads of an earlier run: their clients were never given a job
    shutil.rmtree(state / "uploads", ignore_errors=True)
    store = JobStore(state, models, workers=args.workers, device=args.device, runtime=args.runtime,
                     threads=args.threads, keep_s=args.keep_minutes * 60)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        raise UNetSegError(f"Cannot listen on {args.host}:{args.port} ({error.strerror}); choose another "
                           "--port.") from None
    # listen now: uvicorn only listens after the lifespan start-up (loading the models), and a client
    # told "listening" must not be refused meanwhile; its connection waits in the backlog instead
    sock.listen(2048)
    port = sock.getsockname()[1]
    scheme = "https" if args.ssl_certfile else "http"
    if args.host not in ("127.0.0.1", "localhost", "::1") and scheme == "http":
        print("unetseg: warning: serving plain HTTP beyond this computer: scans and the token cross the "
              "network unencrypted. Use --ssl-certfile/--ssl-keyfile, or a TLS reverse proxy.",
              file=sys.stderr)

    def ready() -> None:
        resumed = f"; {len(store.resumed)} job(s) resumed" if store.resumed else ""
        print(f"unetseg serve: listening on {scheme}://{args.host}:{port} (models: {', '.join(models)}; "
              f"{store.n_workers} worker(s){resumed})", file=sys.stderr, flush=True)

    app = create_app(store, token, int(args.max_upload_mb * 1e6), on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an inference server (HTTP) with a job queue and warm workers")
    p.add_argument("--models", nargs="+", help="model ids or package folders to serve (default: the "
                                               "default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: only "
                                                       "this computer; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0: any free one, printed at start)")
    p.add_argument("--token-file", dest="token_file",
                   help=f"file holding the access token (else ${TOKEN_ENV}); never on the command line")
    p.add_argument("--state-dir", dest="state_dir", default="unetseg-server",
                   help="folder for uploads, jobs and results (kept across restarts: jobs resume)")
    p.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=1024.0)
    p.add_argument("--keep-minutes", dest="keep_minutes", type=float, default=60.0,
                   help="finished jobs not downloaded are deleted after this long")
    p.add_argument("--workers", type=int, help="jobs run at once (default: one per GPU; on a CPU, 1, "
                                               "which uses every core)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                   help="what runs the network on a CPU, as for segment (openvino-int8, openvino-bf16: "
                        "see the README's Runtimes)")
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: PyTorch's)")
    p.add_argument("--ssl-certfile", dest="ssl_certfile")
    p.add_argument("--ssl-keyfile", dest="ssl_keyfile")
    p.set_defaults(func=serve_cli)


def submit_cli(args) -> int:
    """``unetseg submit``: one scan through a server, with the same progress display as ``segment``."""
    from ..pipeline import TerminalProgress, check_output, output_kind
    from .client import ServerClient

    kind = output_kind(args.output)
    name = args.output.lower()
    output = "dicom-seg" if kind == "dicom-seg" else "seg.nrrd" if kind == "seg.nrrd" else \
        "nii.gz" if name.endswith(".nii.gz") else "nrrd" if name.endswith(".nrrd") else None
    if output is None:
        raise UNetSegError(f"A server writes .seg.nrrd, .dcm (DICOM SEG), .nii.gz or .nrrd, not "
                           f"'{Path(args.output).name}'.")
    out_path = check_output(args.output, kind, [args.input])
    client = ServerClient(args.server, read_token(args.token_file))
    model = args.model or client.models()["models"][0]["id"]
    progress = TerminalProgress(quiet=args.quiet)
    client.segment(args.input, out_path, model, output, progress=progress)
    progress.finish()
    if not args.quiet:
        print(f"Wrote {out_path} (model '{model}', on {client.url})", file=sys.stderr)
    return 0


def add_submit_parser(sub) -> None:
    p = sub.add_parser("submit", help="segment a scan on an 'unetseg serve' server")
    p.add_argument("input", help="NIfTI/NRRD/MHA file, or a DICOM series folder (zipped on the way)")
    p.add_argument("-o", "--output", required=True, help=".seg.nrrd, .dcm (DICOM SEG), .nii.gz or .nrrd")
    p.add_argument("--server", required=True, help="the server's address, e.g. http://gpu-box:8765")
    p.add_argument("--model", help="a model the server serves (default: its first)")
    p.add_argument("--token-file", dest="token_file", help=f"file holding the token (else ${TOKEN_ENV})")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=submit_cli)
