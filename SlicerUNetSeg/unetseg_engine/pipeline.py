"""File in, file out: what ``unetseg segment`` does, with a terminal progress display and timings."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import UNetSegError
from .imageio import SEG_EXTENSION, check_output_path, read_image, write_label_map


class TerminalProgress:
    """One updating line per stage: ``[inference] 42%``; a plain line per stage when not a TTY."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        # sys.stderr is looked up now, not at import: it may have been replaced since
        self.stream, self.quiet = stream or sys.stderr, quiet
        self.stage, self.last_percent = None, -1
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


def segment_files(inputs: list[str], output: str, *, model: str | None = None, device: str = "auto",
                  window=None, overlap=None, sw_batch_size=None, tta: bool = False,
                  postprocess: bool = True, quiet: bool = False, runtime: str = "auto"):
    """Read the inputs, segment them, and write ``output`` (label map or .seg.nrrd) atomically.

    Every check (output folder, model, inputs) runs before the slow work, so bad input fails fast
    and leaves no file behind.
    """
    from .modelpkg import get_model

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out_path = check_output_path(output)
    package = get_model(model)
    n_expected = len(package.meta["inputs"])
    if len(inputs) != n_expected:
        names = ", ".join(i["name"] for i in package.meta["inputs"])
        raise UNetSegError(f"Model '{package.id}' takes {n_expected} input volume(s) ({names}); "
                           f"{len(inputs)} were given.")
    progress = TerminalProgress(quiet=quiet)
    progress("reading input", 0.0)
    t = time.perf_counter()
    images = [read_image(p) for p in inputs]
    timings["read_s"] = time.perf_counter() - t

    from .inference import Predictor

    t = time.perf_counter()
    progress("loading model", 0.0)
    predictor = Predictor(device=device, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta,
                          postprocess=postprocess, runtime=runtime)
    predictor.load(package)
    timings["load_model_s"] = time.perf_counter() - t
    result = predictor.predict(images, window=window, progress=progress)
    timings.update(result.timings)

    t = time.perf_counter()
    progress("writing output", 0.0)
    if out_path.name.lower().endswith(SEG_EXTENSION):
        from .segfile import write_seg_nrrd

        write_seg_nrrd(out_path, result.label_map, package.labels, result.masks)
    else:
        write_label_map(result.label_map, out_path)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    progress.finish()
    if not quiet:
        for message in result.messages:
            print(f"note: {message}", file=sys.stderr)
        stages = "  ".join(f"{k[:-2]} {v:.2f}s" for k, v in timings.items() if k != "total_s")
        from .runtimes import RUNTIME_TITLES

        print(f"Segmented {Path(inputs[0]).name} with '{package.id}' on {result.device} "
              f"({RUNTIME_TITLES[result.runtime]}) in "
              f"{timings['total_s']:.1f} s ({stages})", file=sys.stderr)
        print(f"Wrote {out_path}", file=sys.stderr)
    return result, timings
