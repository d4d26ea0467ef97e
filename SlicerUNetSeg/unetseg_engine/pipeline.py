"""File in, file out: what ``unetseg segment`` does, with a terminal progress display and timings."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import check_settings, modality_warnings
from .dicomseries import check_modality
from .errors import UNetSegError
from .imageio import read_image
from .outputs import LABEL_EXTENSIONS, SEG_EXTENSION, check_output_path, write_label_map

if TYPE_CHECKING:
    from .inference import Predictor, SegmentationResult

DICOM_EXTENSION = ".dcm"


class TerminalProgress:
    """One updating line per stage: ``[inference] 42%``; a plain line per stage when not a TTY."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        # sys.stderr is looked up now, not at import: it may have been replaced since
        self.stream, self.quiet = stream or sys.stderr, quiet
        self.stage: str | None = None
        self.last_percent = -1
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, stage: str, fraction: float) -> None:
        if self.quiet:
            return
        percent = int(round(fraction * 100))
        if stage != self.stage:
            if self.stage is not None and self.tty:
                self.stream.write("\n")
            self.stage, self.last_percent = stage, -1
            if not self.tty:
                self.stream.write(f"[{stage}]\n")
        if self.tty and percent != self.last_percent:
            self.stream.write(f"\r[{stage}] {percent:3d}%")
        elif not self.tty and stage == "inference" and percent // 25 != self.last_percent // 25:
            self.stream.write(f"  inference {percent}%\n")
        self.last_percent = percent
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet and self.stage is not None:
            self.stream.write("\n")


# --output-type values, and the file name ending each implies
OUTPUT_TYPES = {"seg.nrrd": SEG_EXTENSION, "nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha",
                "dicom-seg": DICOM_EXTENSION}


def output_kind(output: str | Path, output_type: str | None = None) -> str:
    """What to write: 'dicom-seg', 'seg.nrrd' or 'label' (a label map), from ``--output-type`` or, when
    that is not given, the output's name (``.dcm`` is a DICOM SEG). Conflicts are errors."""
    name = Path(output).name.lower()
    inferred = ("dicom-seg" if name.endswith(DICOM_EXTENSION) else "seg.nrrd" if name.endswith(SEG_EXTENSION)
                else "label" if name.endswith(LABEL_EXTENSIONS) else None)
    if output_type is None:
        return inferred or "label"  # an unknown ending is refused by check_output_path, as before
    if output_type not in OUTPUT_TYPES:
        raise UNetSegError(f"Unknown output type '{output_type}': use one of {', '.join(OUTPUT_TYPES)}.")
    wanted = output_type if output_type in ("dicom-seg", "seg.nrrd") else "label"
    if inferred is not None and inferred != wanted or inferred is None and wanted != "dicom-seg":
        raise UNetSegError(f"The output '{Path(output).name}' does not match --output-type {output_type}; "
                           f"name it ...{OUTPUT_TYPES[output_type]}.")
    return wanted


def check_output(output: str | Path, kind: str, inputs=()) -> Path:
    """The output path, checked before any slow work: writable, and none of the ``inputs``."""
    return check_output_path(output, inputs, dicom_seg=kind == "dicom-seg")


def dicom_source(input_path: str | Path):
    """The DICOM series (and its headers) a DICOM SEG output will reference: the input must be one."""
    from .dicomseg import read_source_headers
    from .dicomseries import one_series

    path = Path(input_path)
    if not path.is_dir():
        raise UNetSegError(f"DICOM SEG output needs a DICOM series folder as input; '{path.name}' is "
                           f"{'a file' if path.exists() else 'not there'}. Write .seg.nrrd or a label "
                           "map (.nii.gz) instead, or give the folder of the original DICOM series.")
    series = one_series(path)
    return series, read_source_headers(series)


def write_result(result, out_path: Path, kind: str, dicom=None) -> list[str]:
    """Write ``result`` as ``kind`` (see ``output_kind``); returns notes for the user."""
    if kind == "seg.nrrd":
        from .segfile import write_seg_nrrd

        write_seg_nrrd(out_path, result.label_map, result.model.labels, result.masks)
        return []
    if kind == "dicom-seg":
        from .dicomseg import write_dicom_seg

        series, datasets = dicom
        empty = write_dicom_seg(out_path, result.label_map, result.model.labels, series,
                                result.model.meta, result.masks, datasets)
        return [f"no voxels for {', '.join(empty)} (empty segments in the DICOM SEG)"] if empty else []
    write_label_map(result.label_map, out_path)
    return []


def load_predictor(package, **knobs) -> Predictor:
    """A ``Predictor`` with ``knobs`` (device, overlap, sw_batch_size, tta, postprocess) and
    ``package`` loaded: what ``segment`` uses once and ``batch`` keeps warm over every study."""
    from .inference import Predictor

    predictor = Predictor(**knobs)
    predictor.load(package)
    return predictor


def run_one(predictor: Predictor, images, out_path: Path, kind: str, *, window=None, progress=None,
            dicom=None, cancel=None) -> tuple[SegmentationResult, dict[str, float], list[str]]:
    """Segment already-read ``images`` with a loaded ``predictor`` and write the result: the step
    ``segment``, ``batch`` and the server's workers share. Returns (result, timings, notes).
    ``cancel``: a callable; when it returns True the run stops with ``CancelledError``."""
    result = predictor.predict(images, window=window, progress=progress, cancel=cancel)
    timings = dict(result.timings)
    t = time.perf_counter()
    if progress:
        progress("writing output", 0.0)
    notes = list(result.messages) + write_result(result, out_path, kind, dicom)
    timings["write_s"] = time.perf_counter() - t
    return result, timings, notes


def segment_files(inputs: list[str], output: str, *, model: str | None = None, device: str = "auto",
                  window=None, overlap=None, sw_batch_size=None, tta: bool = False,
                  postprocess: bool = True, quiet: bool = False, output_type: str | None = None,
                  runtime: str = "auto", uncertainty: str | None = None, review_json: str | None = None,
                  mirror: bool = True):
    """Read the inputs, segment them, and write ``output`` (label map, .seg.nrrd or DICOM SEG)
    atomically.

    Every check (settings, output path, model, inputs) runs before the slow work, so bad input fails
    fast and leaves no file behind. A scan that does not look like the model's modality is warned
    about at once, on stderr, even with ``quiet``: the user may want to stop the run.
    """
    from .modelpkg import get_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_settings(window=window, overlap=overlap, sw_batch_size=sw_batch_size)
    kind = output_kind(output, output_type)
    out_path = check_output(output, kind, inputs)
    extra_outputs = check_extra_outputs(out_path, inputs, uncertainty, review_json)
    package = get_model(model)
    desc = package.desc
    if len(inputs) != desc.n_inputs:
        raise UNetSegError(f"Model '{desc.id}' takes {desc.n_inputs} input volume(s) "
                           f"({', '.join(desc.inputs)}); {len(inputs)} were given.")
    for path in inputs:
        if Path(path).is_dir():  # a DICOM series says what it is: an MR series for a CT model is refused
            check_modality(path, desc.modality, desc.id)
    dicom = dicom_source(inputs[0]) if kind == "dicom-seg" else None
    progress = TerminalProgress(quiet=quiet)
    progress("reading input", 0.0)
    t = time.perf_counter()
    images = [read_image(p) for p in inputs]
    timings["read_s"] = time.perf_counter() - t
    warnings = modality_warnings(images, desc.modality)
    for warning in warnings:
        print(f"unetseg: warning: {warning}", file=sys.stderr)

    t = time.perf_counter()
    progress("loading model", 0.0)
    predictor = load_predictor(package, device=device, overlap=overlap, sw_batch_size=sw_batch_size,
                               tta=tta, postprocess=postprocess, runtime=runtime,
                               uncertainty=uncertainty is not None, mirror=mirror)
    timings["load_model_s"] = time.perf_counter() - t
    result, run_timings, notes = run_one(predictor, images, out_path, kind, window=window,
                                         progress=progress, dicom=dicom)
    write_review_outputs(result, *extra_outputs)
    timings.update(run_timings)
    timings["total_s"] = time.perf_counter() - t0
    progress.finish()
    if not quiet:
        for message in notes:
            if message not in warnings:  # printed before the run already
                print(f"note: {message}", file=sys.stderr)
        stages = "  ".join(f"{k[:-2]} {v:.2f}s" for k, v in timings.items() if k != "total_s")
        from .runtimes import RUNTIME_TITLES

        print(f"Segmented {Path(inputs[0]).name} with '{package.id}' on {result.device} "
              f"({RUNTIME_TITLES[result.runtime]}) in "
              f"{timings['total_s']:.1f} s ({stages})", file=sys.stderr)
        for line in review_lines(result.review or []):
            print(line, file=sys.stderr)
        print(f"Wrote {out_path}", file=sys.stderr)
        for path in extra_outputs:
            if path is not None:
                print(f"Wrote {path}", file=sys.stderr)
    return result, timings


def check_extra_outputs(out_path: Path, inputs, uncertainty, review_json):
    """The --uncertainty map and --review-json paths, checked like the main output (and distinct)."""
    from .outputs import check_output_path

    checked: list[Path | None] = []
    taken = [out_path]
    for path, what in ((uncertainty, "--uncertainty"), (review_json, "--review-json")):
        if path is None:
            checked.append(None)
            continue
        if what == "--review-json" and not str(path).lower().endswith(".json"):
            raise UNetSegError(f"{what} '{Path(path).name}': name it ...json.")
        checked_path = check_output_path(path, inputs, any_name=what == "--review-json")
        if any(checked_path.resolve() == t.resolve() for t in taken):
            raise UNetSegError(f"{what} '{path}' is the same file as another output; give it its own name.")
        taken.append(checked_path)
        checked.append(checked_path)
    return checked


def write_review_outputs(result, uncertainty_path: Path | None, review_path: Path | None) -> None:
    """Write the uncertainty map and the review JSON atomically (verified like the label map)."""
    import json

    from .outputs import atomic_write, write_label_map

    if uncertainty_path is not None and result.uncertainty is not None:
        write_label_map(result.uncertainty, uncertainty_path)
    if review_path is not None:
        text = json.dumps({"model": result.model.id, "model_version": result.model.desc.version,
                           "labels": result.review}, indent=2) + "\n"
        atomic_write(review_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def review_lines(review: list[dict]) -> list[str]:
    """The CLI summary of a review: one line per label (volume, confidence, flags)."""
    lines = ["Review (confidence: 0-1, higher is surer; flags: what to check):"] if review else []
    width = max((len(e["name"]) for e in review), default=0)
    for e in review:
        confidence = f"{e['confidence']:.2f}" if e["confidence"] is not None else "  - "
        flags = "; ".join(f"{f['code']}: {f['message']}" for f in e["flags"])
        lines.append(f"  {e['name']:<{width}}  {e['volume_ml']:8.1f} ml  confidence {confidence}"
                     + (f"  FLAG {flags}" if flags else ""))
    return lines
