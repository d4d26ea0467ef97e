"""``unetseg batch``: every scan under a folder, one warm model, a result and a log per study, a CSV.

Scans are NIfTI/NRRD/MHA files and DICOM series (grouped per folder by Series Instance UID, as
GDCM reads them; series of other modalities than the model's are left out). Each scan goes through
the same step as ``unetseg segment`` (``pipeline.run_one``) with one ``Predictor`` loaded once.

Per scan, in ``OUTPUT_ROOT/<study>/`` (the study's path under the input root; a DICOM series adds
its Series Instance UID): ``segmentation.<ext>``, ``log.txt`` and, only once the result has been
renamed into place, ``segmentation.<ext>.done.json``. A later run skips a scan whose marker names
the same model (weights) and whose result is there, so an interrupted batch resumes where it
stopped; a result without a marker (a crash between the two) is made again, and a half-written one
never has the result's name (results are written to a temporary name and renamed). A failing scan is
logged and the batch goes on.
``OUTPUT_ROOT/summary.csv`` (rewritten after every scan) lists study, series, status, time and the
volume of every label in ml.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicomseries import DicomSeries, read_series, series_in_folder
from .errors import UNetSegError
from .imageio import read_image
from .outputs import LABEL_EXTENSIONS, SEG_EXTENSION, atomic_write
from .pipeline import OUTPUT_TYPES, load_predictor, output_kind, run_one

MARKER = "done.json"
CSV_FIELDS = ["study", "series", "modality", "status", "time_s", "output", "message"]


@dataclass(frozen=True)
class Scan:
    """One scan to segment: a volume file, or one DICOM series."""

    key: str  # its folder under the output root
    study: str  # path under the input root
    path: Path
    series: DicomSeries | None = None

    @property
    def series_uid(self) -> str:
        return self.series.series_uid if self.series else ""

    @property
    def modality(self) -> str:
        return self.series.modality if self.series else ""


def _image_stem(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(SEG_EXTENSION):  # a Slicer segmentation is a result, not a scan
        return None
    for ext in LABEL_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def find_scans(root: str | os.PathLike, modality: str | None = None,
               exclude: Path | None = None) -> tuple[list[Scan], dict[str, int]]:
    """Scans under ``root`` in a stable order, and the DICOM series left out per modality.

    ``modality`` (e.g. "CT") keeps DICOM series of that modality only; files carry no modality and
    are always kept. ``exclude`` (the output root, if it lies inside) is not searched.
    """
    root = Path(root)
    scans: list[Scan] = []
    skipped: dict[str, int] = {}
    keys: set[str] = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if exclude is None or (here / d).resolve() != exclude)
        rel = here.relative_to(root).as_posix()
        others = False
        for name in sorted(files):
            stem = _image_stem(name)
            if stem is None:
                others = others or not name.lower().endswith(SEG_EXTENSION)
                continue
            key = f"{rel}/{stem}" if rel != "." else stem
            if key in keys:  # ct.nii.gz next to ct.nrrd
                key = f"{key}_{name[len(stem):].lstrip('.').replace('.', '_')}"
            keys.add(key)
            scans.append(Scan(key, f"{rel}/{name}" if rel != "." else name, here / name))
        if not others:
            continue
        for series in series_in_folder(here):
            if modality and series.modality != modality.upper():
                skipped[series.modality or "unknown"] = skipped.get(series.modality or "unknown", 0) + 1
                continue
            key = f"{rel}/{series.series_uid}" if rel != "." else series.series_uid
            scans.append(Scan(key, rel if rel != "." else root.name, here, series))
    return scans, skipped


def label_volumes_ml(result) -> dict[str, float]:
    """Volume of each label in ml, on the input grid."""
    import SimpleITK as sitk

    voxel_ml = float(np.prod(result.label_map.GetSpacing())) / 1000.0
    labels = result.model.labels
    if result.masks is not None:
        counts = {v: int(mask.sum()) for v, (_, mask) in result.masks.items()}
    else:
        values = np.bincount(sitk.GetArrayViewFromImage(result.label_map).ravel())
        counts = {lb["value"]: int(values[lb["value"]]) if lb["value"] < values.size else 0 for lb in labels}
    return {label["name"]: round(counts.get(label["value"], 0) * voxel_ml, 3) for label in labels}


class _Log:
    """The per-study log: stages with times, notes, errors."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.stage: str | None = None

    def write(self, text: str) -> None:
        self.file.write(f"[{time.perf_counter() - self.t0:7.2f} s] {text}\n")
        self.file.flush()

    def progress(self, stage: str, fraction: float) -> None:
        if stage != self.stage:
            self.stage = stage
            self.write(stage)

    def close(self) -> None:
        self.file.close()


class BatchRunner:
    """Segments scans one after another with one loaded model; built complete, reusable."""

    def __init__(self, package, output_root: str | os.PathLike, output_type: str = "seg.nrrd", *,
                 window=None, quiet: bool = False, stream=None, predictor=None, load: bool = True,
                 **knobs) -> None:
        """``predictor``: one already loaded with these ``knobs`` (a cluster worker keeps one warm);
        ``load=False``: none at all (the cluster's client, which only skips, reports and summarises)."""
        if output_type not in OUTPUT_TYPES or output_type in ("nrrd", "mha"):
            raise UNetSegError(f"Unknown batch output type '{output_type}': use seg.nrrd, nii.gz or "
                               "dicom-seg.")
        if len(package.meta["inputs"]) != 1:
            raise UNetSegError(f"Model '{package.id}' takes {len(package.meta['inputs'])} input "
                               "volumes; batch runs single-input models (use 'segment' per case).")
        self.package, self.output_root = package, Path(output_root)
        self.output_type, self.window, self.quiet = output_type, window, quiet
        self.kind = output_kind("segmentation" + OUTPUT_TYPES[output_type], output_type)
        self.stream = stream or sys.stderr
        self.predictor = predictor if predictor is not None or not load else load_predictor(package, **knobs)
        self.records: dict[str, dict] = {}
        self._order: dict[str, int] = {}  # the summary lists studies in the order they were found

    @property
    def output_name(self) -> str:
        return "segmentation" + OUTPUT_TYPES[self.output_type]

    def _marker(self, folder: Path) -> Path:
        """One marker per output type: a finished .seg.nrrd says nothing about a .dcm."""
        return folder / f"{self.output_name}.{MARKER}"

    def _done_before(self, folder: Path) -> dict | None:
        try:
            record = json.loads(self._marker(folder).read_text())
        except (OSError, ValueError):
            return None
        same = record.get("weights") == self.package.weights_key and record.get("output") == \
            self.output_name and (folder / self.output_name).is_file()
        return record if same else None

    def done_before(self, scans: list[Scan]) -> dict[str, dict]:
        """The scans a completed marker says were done with this model, by key."""
        return {s.key: r for s in scans if (r := self._done_before(self.output_root / s.key))}

    def run_scan(self, scan: Scan, note: str | None = None) -> dict:
        """Segment one scan into its folder; never raises for a failing scan (KeyboardInterrupt aside).
        ``note`` is logged after the first line (a cluster worker says which it is)."""
        from .dicomseg import read_source_headers

        folder = self.output_root / scan.key
        folder.mkdir(parents=True, exist_ok=True)
        record = {"study": scan.study, "series": scan.series_uid, "modality": scan.modality,
                  "output": self.output_name, "model": self.package.id,
                  "weights": self.package.weights_key}
        log = _Log(folder / "log.txt")
        log.write(f"{scan.path} with '{self.package.id}' v{self.package.meta['version']} -> "
                  f"{folder / self.output_name}")
        if note:
            log.write(note)
        t0 = time.perf_counter()
        try:
            dicom = None
            if self.kind == "dicom-seg":
                if scan.series is None:
                    raise UNetSegError(f"DICOM SEG output needs a DICOM series; '{scan.study}' is a "
                                       "file. Use --output-type seg.nrrd or nii.gz for files.")
                dicom = (scan.series, read_source_headers(scan.series))
            log.write("reading input")
            image = read_series(scan.series) if scan.series else read_image(scan.path)
            result, timings, notes = run_one(self.predictor, [image], folder / self.output_name,
                                             self.kind, window=self.window, progress=log.progress,
                                             dicom=dicom)
            del image
            record.update(status="done", volumes_ml=label_volumes_ml(result), message="; ".join(notes))
            del result
            for note in notes:
                log.write(f"note: {note}")
            log.write("timings: " + "  ".join(f"{k[:-2]} {v:.2f}s" for k, v in timings.items()))
        except UNetSegError as error:
            record.update(status="failed", message=str(error))
            log.write(f"error: {error}")
        except Exception as error:  # a bug or a resource problem: keep going, keep the traceback
            record.update(status="failed", message=f"{type(error).__name__}: {error}")
            log.write("error:\n" + traceback.format_exc())
        record["time_s"] = round(time.perf_counter() - t0, 3)
        if record["status"] == "done":  # written last: the result is already complete
            atomic_write(self._marker(folder), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
        # after a failure nothing was written, so an older marker still describes the file beside it
        log.write(f"{record['status']} in {record['time_s']:.2f} s")
        log.close()
        return record

    def run(self, scans: list[Scan]) -> list[dict]:
        """Every scan (skipping those done before), with progress and an ETA; returns the records."""
        done = self.done_before(scans)
        progress = self.start(scans, done)
        for scan in scans:
            if scan.key in done:
                self.finish(scan, {**done[scan.key], "status": "done before"}, progress)
            else:
                self.finish(scan, self.run_scan(scan), progress)
        return [self.records[s.key] for s in scans]

    def start(self, scans: list[Scan], done: dict[str, dict], parallel: bool = False) -> _Progress:
        """Begin a run over ``scans``, of which ``done`` were done before: the progress display."""
        for scan in scans:
            self._order.setdefault(scan.key, len(self._order))
        return _Progress(len(scans), sum(1 for s in scans if s.key not in done), parallel)

    def finish(self, scan: Scan, record: dict, progress: _Progress, where: str = "") -> None:
        """One scan's record: into the summary (rewritten), and a progress line with the ETA."""
        self.records[scan.key] = record
        self.write_summary()
        eta = progress.step(record)
        if not self.quiet:
            what = f"{record['status']} in {record['time_s']:.1f} s{where}" if record["status"] != \
                "done before" else "done before, skipped"
            print(f"[{progress.index}/{progress.n}] {scan.key}: {what}{eta}", file=self.stream, flush=True)
            if record["status"] == "failed":
                print(f"    {record['message']}", file=self.stream, flush=True)

    def write_summary(self) -> Path:
        names = self.package.label_names
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_FIELDS + [f"{name}_ml" for name in names])
        writer.writeheader()
        for key in sorted(self.records, key=lambda k: self._order.get(k, len(self._order))):
            record = self.records[key]
            row = {k: record.get(k, "") for k in CSV_FIELDS}
            row.update({f"{name}_ml": record.get("volumes_ml", {}).get(name, "") for name in names})
            writer.writerow(row)
        path = self.output_root / "summary.csv"
        atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
        return path


class _Progress:
    """Studies reported so far and the ETA of the rest. One machine: the mean time of the studies
    run times those left. A cluster (``parallel``): the wall time per study finished so far, which
    counts every worker, times those left."""

    def __init__(self, n: int, to_run: int, parallel: bool = False) -> None:
        self.n, self.to_run, self.parallel = n, to_run, parallel
        self.index, self.ran, self.ran_time, self.t0 = 0, 0, 0.0, time.perf_counter()

    def step(self, record: dict) -> str:
        """Count one study reported; the ETA text to show after it ("" when none)."""
        self.index += 1
        if record["status"] != "done before":
            self.ran, self.ran_time = self.ran + 1, self.ran_time + record["time_s"]
        left = self.to_run - self.ran
        if not self.ran or not left:
            return ""
        per_study = (time.perf_counter() - self.t0 if self.parallel else self.ran_time) / self.ran
        return f", ETA {_clock(per_study * left)}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def batch_cli(args) -> int:
    """``unetseg batch``: exit 0 when every scan is done, 1 when some failed, 2 on a usage error."""
    from .modelpkg import get_model

    root, out = Path(args.input_root), Path(args.output)
    cluster = getattr(args, "cluster", None)
    if cluster:  # the workers are given absolute paths, which they must see too
        root, out = root.resolve(), out.resolve()
    if not root.is_dir():
        raise UNetSegError(f"The input root '{root}' is not a folder. Give the folder that holds the "
                           "scans (files or DICOM series, in any subfolders).")
    if out.resolve() == root.resolve():
        raise UNetSegError("The output root must not be the input root; give another folder.")
    package = get_model(args.model)
    client = None
    if cluster:  # first: an unreachable scheduler fails in seconds, and nothing is made
        from .cluster import connect

        client = connect(cluster)
    try:
        return _run_batch(args, root, out, package, client)
    finally:
        if client is not None:
            client.close()


def _run_batch(args, root: Path, out: Path, package, client) -> int:
    from .cli import _window

    modality = None if (args.modality or "").lower() == "any" else (args.modality or package.meta["modality"])
    out.mkdir(parents=True, exist_ok=True)
    scans, skipped = find_scans(root, modality, exclude=out.resolve())
    note = ", ".join(f"{count} {mod}" for mod, count in sorted(skipped.items()))
    if not scans:
        raise UNetSegError(f"No scans found under '{root}' (NIfTI/NRRD/MHA files or DICOM series"
                           f"{f' of modality {modality}' if modality else ''}"
                           f"{f'; left out: {note} series' if note else ''}).")
    if not args.quiet:
        print(f"{len(scans)} scan(s) under {root}" + (f" (left out, not {modality}: {note} series)"
                                                      if note else ""), file=sys.stderr)
    knobs = {"device": args.device, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
             "tta": args.tta, "postprocess": not args.no_postprocess, "runtime": args.runtime}
    # with a cluster the model is loaded on its workers, not here
    runner = BatchRunner(package, out, args.output_type, window=_window(args.window), quiet=args.quiet,
                         load=client is None, **knobs)
    try:
        if client is not None:
            from .cluster import run_on_cluster

            records = run_on_cluster(runner, scans, client, args.cluster, root, knobs)
        else:
            records = runner.run(scans)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the studies finished so far are kept, with their markers; run the "
                                "same command again to go on.") from None
    failed = [r for r in records if r["status"] == "failed"]
    if not args.quiet:
        print(f"{len(records) - len(failed)} done, {len(failed)} failed; summary: {out / 'summary.csv'}",
              file=sys.stderr)
    return 1 if failed else 0
