"""The messages between the worker process (``unetseg_engine.worker``) and whoever drives it (the
Slicer module's ``SlicerUNetSegLib.workerRunner``): one definition that both sides import.

JSON lines, UTF-8: one request per line on the worker's stdin, one event per line on its stdout. Each
message is a dataclass here; ``to_json`` gives the line's object (with its ``"cmd"`` or ``"event"``),
``parse_request`` / ``parse_event`` turn an object back into the dataclass and refuse anything else
(not an object, an unknown command or event, a missing field, a field of the wrong type, a field
this version does not know) with a ``ProtocolError`` that says which, so a typo such as
``"overlapp"`` is an error instead of a setting silently ignored.

Geometry travels in one place only: the input file's header. The Slicer side writes each input with
Slicer's own NRRD writer (``geometry.writeVolumeForWorker``), which stores the volume's local
IJK-to-RAS as LPS space directions and origin; the worker reads the image with that geometry as it is.
An input record has no spacing, origin or direction fields, and a request that sends them is refused
(protocol 1 sent them beside the header and the worker trusted those instead).

Imports only the standard library: the Slicer side uses it before torch is installed.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Union

PROTOCOL_VERSION = 2  # 2: geometry from the file header only; typed messages refuse unknown fields

ERROR_KINDS = ("user", "cancelled", "internal", "crashed")  # crashed: said by the runner, not the worker


class ProtocolError(ValueError):
    """A message that is not one this protocol version knows: a bug or a version mismatch between the
    module and the worker, never the user's doing."""


# ---- requests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputVolume:
    """One input channel: an uncompressed .nrrd whose header holds the geometry (LPS) and whose voxels
    are read in (k, j, i) order. ``name`` is the volume's name, for messages."""

    path: str
    name: str | None = None


@dataclass(frozen=True)
class HelloRequest:
    cmd: ClassVar[str] = "hello"


@dataclass(frozen=True)
class QuitRequest:
    cmd: ClassVar[str] = "quit"


@dataclass(frozen=True)
class CancelRequest:
    """Handled at once by the worker's reader thread; the run stops at its next check."""

    id: str
    cmd: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class SegmentRequest:
    """Segment ``inputs`` (one per model channel) with ``model`` (an installed id or a package folder;
    None: the default) and write the results into ``output_dir``."""

    id: str
    inputs: list[InputVolume]
    output_dir: str
    model: str | None = None
    model_id: str | None = None  # the model's id, for a runner that sends it elsewhere (a server)
    device: str = "auto"  # checked by the predictor (checks.check_device, runtimes.check_runtime)
    runtime: str = "auto"
    window: tuple[float, float] | None = None  # (level, width); None: the model's
    overlap: float | None = None  # None: the model's
    sw_batch_size: int | None = None
    tta: bool = False
    postprocess: bool = True
    uncertainty: bool = False
    cmd: ClassVar[str] = "segment"

    @property
    def settings(self) -> RunSettings:
        return RunSettings(overlap=self.overlap, sw_batch_size=self.sw_batch_size, tta=self.tta,
                           postprocess=self.postprocess, uncertainty=self.uncertainty)


@dataclass(frozen=True)
class FinetuneRequest:
    """``unetseg finetune``: train on ``dataset``, evaluate, install only if not worse. ``settings``
    are ``FinetuneSettings`` fields (checked by that class)."""

    id: str
    dataset: str
    output: str
    model: str | None = None
    validation_dataset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    cmd: ClassVar[str] = "finetune"


Request = HelloRequest | QuitRequest | CancelRequest | SegmentRequest | FinetuneRequest
REQUESTS: dict[str, type] = {c.cmd: c for c in (HelloRequest, QuitRequest, CancelRequest, SegmentRequest,
                                                 FinetuneRequest)}


@dataclass(frozen=True)
class RunSettings:
    """The per-run settings of a segment request that a warm predictor takes (checked by the worker
    with ``checks.check_settings`` before any is applied)."""

    overlap: float | None = None
    sw_batch_size: int | None = None
    tta: bool = False
    postprocess: bool = True
    uncertainty: bool = False


# ---- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadyEvent:
    """The worker's first line: its own pid (under Slicer's launcher, not the launcher's) and the
    protocol version it speaks."""

    pid: int
    protocol: int
    event: ClassVar[str] = "ready"


@dataclass(frozen=True)
class HelloEvent:
    """Python, PyTorch, CUDA and MONAI versions and the GPU, for the panel's device line."""

    pid: int
    python: str
    torch: str | None = None
    cuda: str | None = None
    cuda_available: bool = False
    gpu_name: str | None = None
    monai: str | None = None
    torch_error: str | None = None
    utf8_mode: bool | None = None  # Python's UTF-8 mode (the runner asks for it: PYTHONUTF8=1)
    event: ClassVar[str] = "hello"


@dataclass(frozen=True)
class ProgressEvent:
    id: str
    stage: str
    fraction: float
    event: ClassVar[str] = "progress"


@dataclass(frozen=True)
class MaskFile:
    """One label's own mask: a .npy of a bool (k, j, i) array over the box ``start`` + ``size`` (i, j, k)."""

    path: str
    start: list[int]
    size: list[int]


@dataclass(frozen=True)
class SegmentDone:
    """A segment request's result: ``label_map`` is a .nrrd on the first input's grid (its header
    carries that grid); ``review`` holds per-label figures and flags (``review.py``); ``uncertainty``
    a uint8 .nrrd on the same grid when asked for."""

    id: str
    label_map: str
    model: str
    device: str
    runtime: str
    warm: bool
    masks: dict[str, MaskFile] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    review: list[dict[str, Any]] = field(default_factory=list)
    uncertainty: str | None = None
    event: ClassVar[str] = "done"


@dataclass(frozen=True)
class FinetuneDone:
    """A fine-tune's result: ``FinetuneResult.to_json()`` (accepted, gate figures, paths)."""

    id: str
    result: dict[str, Any]
    summary: str
    event: ClassVar[str] = "done"


@dataclass(frozen=True)
class ErrorEvent:
    """A request failed. ``id`` is None for a line that was not a request at all."""

    id: str | None
    kind: str
    message: str
    traceback: str | None = None
    details: str | None = None
    event: ClassVar[str] = "error"


Event = ReadyEvent | HelloEvent | ProgressEvent | SegmentDone | FinetuneDone | ErrorEvent
# "done" depends on the request it answers
EVENTS: dict[str, type] = {"ready": ReadyEvent, "hello": HelloEvent, "progress": ProgressEvent,
                           "error": ErrorEvent}
DONE_FOR: dict[str, type] = {"segment": SegmentDone, "finetune": FinetuneDone}


# ---- to and from JSON -----------------------------------------------------------------------------
def to_json(message: Request | Event) -> dict[str, Any]:
    """The message as its JSON object, with ``"cmd"`` (a request) or ``"event"`` first."""
    tag = {"cmd": message.cmd} if hasattr(message, "cmd") else {"event": getattr(message, "event")}
    return {**tag, **asdict(message)}


def to_line(message: Request | Event) -> str:
    return json.dumps(to_json(message), allow_nan=False) + "\n"


def parse_request(data: Any) -> Request:
    """A request from its JSON object (or its line); ProtocolError for anything else."""
    data = _object(data, "request")
    cmd = data.get("cmd")
    if cmd not in REQUESTS:
        raise ProtocolError(f"Unknown command {cmd!r} (this worker speaks protocol {PROTOCOL_VERSION}: "
                            f"{', '.join(REQUESTS)}).")
    request = _build(REQUESTS[cmd], {k: v for k, v in data.items() if k != "cmd"}, f"'{cmd}' request")
    if isinstance(request, SegmentRequest) and not request.inputs:
        raise ProtocolError("The 'segment' request has no inputs.")
    return request


def parse_event(data: Any, answering: str | None = None) -> Event:
    """An event from its JSON object (or line). ``answering`` is the command of the request a "done"
    answers ("segment" or "finetune"): the two results differ."""
    data = _object(data, "event")
    name = data.get("event")
    cls = DONE_FOR.get(answering or "") if name == "done" else EVENTS.get(name)
    if cls is None:
        raise ProtocolError(f"Unknown event {name!r}" + (f" (answering {answering!r})" if name == "done"
                                                          else "") + f" in protocol {PROTOCOL_VERSION}.")
    event = _build(cls, {k: v for k, v in data.items() if k != "event"}, f"'{name}' event")
    if isinstance(event, ErrorEvent):
        _check_choice(event.kind, ERROR_KINDS, "error kind")
    return event


def _object(data: Any, what: str) -> dict[str, Any]:
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError:
            raise ProtocolError(f"Bad {what} line (not JSON): {_clip(data)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"Bad {what} (not a JSON object): {_clip(data)}")
    return data


def _clip(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ProtocolError(f"Unknown {what} {value!r}: one of {', '.join(choices)}.")


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        hint = " (the geometry is read from the file's header)" if \
            {"spacing", "origin", "direction"} & set(unknown) else ""
        raise ProtocolError(f"The {what} has fields this protocol ({PROTOCOL_VERSION}) does not know: "
                            f"{', '.join(unknown)}{hint}.")
    values = {}
    for name, f in known.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{what}: '{name}'")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError(f"The {what} lacks its '{name}' field.")
    return cls(**values)


def _convert(value: Any, hint: Any, what: str) -> Any:
    """``value`` as the type ``hint`` says (JSON lists become tuples or dataclasses where declared)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, what)
            except ProtocolError as error:
                errors.append(str(error))
        raise ProtocolError(errors[0] if len(errors) == 1 else f"{what} is {_clip(value)}, of none of "
                                                               f"the types allowed.")
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ProtocolError(f"{what} is {_clip(value)}, not one of {args}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"{what} should be a list, not {_clip(value)}.")
        return [_convert(v, args[0], f"{what}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ProtocolError(f"{what} should be a list of {len(args)}, not {_clip(value)}.")
        return tuple(_convert(v, a, f"{what}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{what} should be an object, not {_clip(value)}.")
        return {str(k): _convert(v, args[1], f"{what}[{k!r}]") for k, v in value.items()}
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise ProtocolError(f"{what} should be an object, not {_clip(value)}.")
        return _build(hint, value, what)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{what} should be a number, not {_clip(value)}.")
        return float(value)
    if hint in (int, bool, str):
        if type(value) is not hint:  # True is not an int here, nor 1 a bool
            raise ProtocolError(f"{what} should be {hint.__name__}, not {_clip(value)}.")
        return value
    raise TypeError(f"workerprotocol cannot read the type {hint!r}")  # a bug in this module
