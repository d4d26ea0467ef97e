"""Our labels on each runtime against nnUNetPredictor's, per label, on real scans: check a runtime
(``openvino-bf16`` above all) on your own nnU-Net model before you rely on it.

For each scan, nnUNetPredictor runs the folder (float32, on the CPU, mirroring as asked) and our
engine runs the same folder, imported, on each runtime given. Printed per scan and runtime: the
per-label Dice against nnUNetPredictor's labels, the worst of them, and the voxels that differ; with
``--labels`` (a folder of reference label maps named like the scans), also each label's Dice against
the reference for nnU-Net's and our labels, so that a difference can be weighed against the error
both make. nnunetv2 must be installed (a test and benchmark dependency, never the engine's).

Usage:
  python scripts/nnunet-agreement.py FOLDER SCAN [SCAN ...] [--runtimes openvino,openvino-bf16]
         [--labels DIR] [--mirror] [--threads 2] [--json OUT]
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from unetseg_engine.metrics import dice


def present_dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two masks, None where the label is in neither (nothing to agree on)."""
    return round(dice(a, b), 4) if a.any() or b.any() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="nnU-Net trained-model folder")
    parser.add_argument("scans", nargs="+", type=Path)
    parser.add_argument("--runtimes", default="openvino,openvino-bf16")
    parser.add_argument("--labels", type=Path, help="folder of reference label maps (same file names, "
                                                    "or nnU-Net's CASE_0000 -> CASE)")
    parser.add_argument("--mirror", action="store_true", help="mirror as nnU-Net does by default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from unetseg_engine.inference import Predictor
    from unetseg_engine.nnunet import import_nnunet
    from unetseg_engine.nnunetbench import nnunet_predictor

    report = []
    with tempfile.TemporaryDirectory(prefix="unetseg-agree-") as tmp:
        os.environ["UNETSEG_USER_MODELS"] = str(Path(tmp) / "user-models")
        package = import_nnunet(args.folder, "checking agreement", model_id="agreement",
                                destination=Path(tmp) / "models")
        labels = package.labels
        predictors = {}
        for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
            predictors[runtime] = Predictor(device="cpu", runtime=runtime, mirror=args.mirror)
            predictors[runtime].load(package)
        nnunet = nnunet_predictor(args.folder, args.mirror)
        for scan in args.scans:
            data, props = SimpleITKIO().read_images([str(scan)])
            theirs = nnunet.predict_single_npy_array(data, props, None, None, False)
            image = sitk.ReadImage(str(scan))
            truth = None
            if args.labels:
                name = scan.name.replace("_0000.", ".")
                truth = sitk.GetArrayFromImage(sitk.ReadImage(str(args.labels / name)))
            for runtime, predictor in predictors.items():
                result = predictor.predict([image])
                ours = sitk.GetArrayFromImage(result.label_map)
                entry = {"scan": scan.name, "runtime": result.runtime, "messages": result.messages,
                         "voxels_differing": int((ours != theirs).sum()), "voxels": int(ours.size),
                         "agreement_dice": {}}
                for label in labels:
                    v = label["value"]
                    score = present_dice(ours == v, theirs == v)
                    if score is not None:
                        entry["agreement_dice"][label["name"]] = score
                    if truth is not None:
                        entry.setdefault("truth_dice", {})[label["name"]] = {
                            "nnunet": present_dice(theirs == v, truth == v),
                            "ours": present_dice(ours == v, truth == v)}
                entry["worst"] = min(entry["agreement_dice"].values(), default=None)
                report.append(entry)
                print(f"{scan.name} {result.runtime}: worst per-label Dice against nnUNetPredictor "
                      f"{entry['worst']}, {entry['voxels_differing']} of {entry['voxels']} voxels differ; "
                      f"{entry['agreement_dice']}")
                if truth is not None:
                    print(f"  against {args.labels.name}: {entry['truth_dice']}")
                for message in result.messages:
                    print(f"  note: {message}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
