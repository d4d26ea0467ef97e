"""Peak memory of one segmentation through the module's logic on a 512 x 512 x 1000 CT (slicer-core).

Prints, for the Slicer process (the logic: writing the input, reading the labels back, building the
segments) and for the worker process (the engine), the peak resident memory above what the process held
before the run, and the time. The volume is synthetic (a CT-like phantom, int16, 0.98 x 0.98 x 1 mm);
the model is the tiny random-weight test model (it checks the data path, not accuracy), so what is
measured is the copies along the way, not the network.

Needs slicer-core, PySide6 and Slicer's own Python modules (as the Testing/slicer suites do). Run:

    QT_QPA_PLATFORM=offscreen PYTHONPATH=SlicerUNetSeg .venv/bin/python scripts/measure-slicer-memory.py

Options: ``--shape K J I`` (default 1000 512 512), ``--device cpu|cuda``, ``--organs``: instead of the
worker, ``organLabels`` (below) answers with one organ-sized sphere per label, as a trained model's labels
are; the random model's labels fill the whole volume, so only this shows the cost of the Slicer
side's copies for real anatomy. ``UNETSEG_CODE=<checkout>`` measures another checkout's module code
(e.g. before a change) with this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("UNETSEG_CODE", REPO))
sys.path.insert(0, str(CODE / "SlicerUNetSeg"))
sys.path.insert(0, str(CODE / "Testing" / "slicer"))  # its harness puts CODE/SlicerUNetSeg first

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import slicer  # noqa: E402  (slicer-core)

import harness  # noqa: E402


def peakSinceReset() -> int:
    """This process's peak resident memory (bytes) since ``resetPeak`` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def resetPeak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class WorkerSampler(threading.Thread):
    """Samples the resident memory of this process's descendants (the worker) every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.baseline, self.running = 0, 0, True

    def rss(self) -> int:
        total = 0
        for child in psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)


def phantom(shape_kji) -> np.ndarray:
    """``syntheticCt`` at 1/8 of the size, repeated up to ``shape_kji`` (int16 HU)."""
    from SlicerUNetSegLib.testing import syntheticCt

    small = syntheticCt(tuple(max(1, s // 8) for s in shape_kji))
    big = small.repeat(8, 0).repeat(8, 1).repeat(8, 2)
    out = np.full(shape_kji, -1000, np.int16)
    region = tuple(slice(0, min(a, b)) for a, b in zip(shape_kji, big.shape))
    out[region] = big[region]
    return out


def organLabels(request) -> list[dict]:
    """The worker's answer to ``request``: one sphere of 15 to 45 mm radius per label."""
    import SimpleITK as sitk

    image = sitk.ImageFileReader()  # the header only: the stand-in adds no copy of the input
    image.SetFileName(request["inputs"][0]["path"])
    image.ReadImageInformation()
    size_kji = image.GetSize()[::-1]
    labels = np.zeros(size_kji, np.uint8)
    rng = np.random.default_rng(0)
    for value in request["label_values"]:
        centre = rng.uniform(0.2, 0.8, 3) * size_kji
        radius = rng.uniform(15, 45)  # voxels of about 1 mm
        box = tuple(slice(max(0, int(c - radius)), min(n, int(c + radius) + 1))
                    for c, n in zip(centre, size_kji))
        k, j, i = np.ogrid[box]
        inside = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 < radius ** 2
        labels[box][inside] = value
    out = Path(request["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    labelImage = sitk.GetImageFromArray(labels)
    del labels
    labelImage.SetSpacing(image.GetSpacing()), labelImage.SetOrigin(image.GetOrigin())
    labelImage.SetDirection(image.GetDirection())
    sitk.WriteImage(labelImage, str(out / "labels.nrrd"), useCompression=False)
    del labelImage
    return [{"event": "done", "id": request["id"], "label_map": str(out / "labels.nrrd"), "masks": None,
             "timings": {}, "device": "stand-in", "messages": [], "model": request["model"], "warm": True}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[1000, 512, 512], metavar=("K", "J", "I"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--organs", action="store_true", help="organ-sized labels from a stand-in worker")
    args = parser.parse_args()
    missing = harness.missingReason()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    harness.install()
    harness.newScene()

    from SlicerUNetSegLib.logic import SlicerUNetSegLogic
    from SlicerUNetSegLib.testing import makeTinyModel
    from SlicerUNetSegLib.workerRunner import WorkerRunner

    models = tempfile.mkdtemp(prefix="unetseg-memory-")
    modelId = str(makeTinyModel(models))
    volume = slicer.util.addVolumeFromArray(phantom(tuple(args.shape)), name="CT")
    volume.SetSpacing(0.98, 0.98, 1.0)
    volume.SetIJKToRASDirections([[-1, 0, 0], [0, -1, 0], [0, 0, 1]])
    voxels = int(np.prod(args.shape))

    launcher = REPO / "Testing" / "slicer" / "fakeLauncher.py"
    if args.organs:
        from SlicerUNetSegLib.testing import StandInRunner

        class OrganRunner(StandInRunner):
            def poll(self):
                events = [e for r in self.pending
                          for e in organLabels({**r, "label_values": self.labelValues})]
                self.pending, self.active = [], None
                return events

        runner = OrganRunner([1, 2, 3])
    else:
        runner = WorkerRunner(python=[sys.executable, str(launcher)])
    logic = SlicerUNetSegLogic(runner=runner)
    sampler = WorkerSampler()
    sampler.start()
    try:
        warmUp = slicer.util.addVolumeFromArray(phantom((64, 64, 64)), name="warm-up")
        logic.process(warmUp, None, modelId, device=args.device)  # worker started, model loaded
        time.sleep(0.5)
        sampler.baseline, sampler.peak = sampler.rss(), 0
        before = psutil.Process().memory_info().rss
        resetPeak()  # the stand-in's own label map (1 byte per voxel) counts in the Slicer process
        t = time.perf_counter()
        segmentation = logic.process(volume, None, modelId, device=args.device)
        seconds = time.perf_counter() - t
        slicerPeak = peakSinceReset() - before
    finally:
        sampler.running = False
        logic.shutdown()
    count = segmentation.GetSegmentation().GetNumberOfSegments()
    mb = 1024 ** 2
    print(f"volume {'x'.join(map(str, args.shape[::-1]))} int16 ({voxels * 2 / mb:.0f} MB), "
          f"{count} segments, {seconds:.1f} s (warm worker)")
    print(f"Slicer process: peak {slicerPeak / mb:.0f} MB above its {before / mb:.0f} MB before the run "
          f"({slicerPeak / voxels:.2f} bytes per voxel)")
    print(f"worker process: peak {(sampler.peak - sampler.baseline) / mb:.0f} MB above its "
          f"{sampler.baseline / mb:.0f} MB when idle ({(sampler.peak - sampler.baseline) / voxels:.2f} bytes "
          "per voxel; sampled every 20 ms)")
    print("timings:", {k: round(v, 2) for k, v in logic.job.timings.items()})
    print("module code:", sys.modules["SlicerUNetSegLib.segmentationBuilder"].__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
