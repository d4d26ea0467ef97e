"""Does the per-label confidence predict Dice? Spearman rank correlation over (patient, organ) pairs.

Runs a model over the validation cases of one or more datasets (the cases ``unetseg evaluate --cases
validation`` picks: the model's recorded validation cases, else the dataset's split), scores each
contoured organ (partial_labels honoured) against its reference, and correlates every candidate
confidence measure in ``unetseg_engine.review.MEASURES`` with Dice. With ``--mirrored`` it also runs
each case mirrored left-right (its header left as it was) and counts the ``left_right_swapped`` flags,
and counts the flags raised on the clean scans.

    PYTHONPATH=SlicerUNetSeg python scripts/confidence_vs_dice.py \\
        --dataset ../shared/data/openkbp_hn_oar --dataset ../shared/data/openkbp_hn_oar_partial \\
        --mirrored -o runs/confidence   # writes pairs.csv, summary.json, confidence_vs_dice.png

(About 7 minutes on 2 CPU cores; ``--mirrored`` doubles it. The README's figure is
``docs/confidence-vs-dice.png``, a copy of confidence_vs_dice.png.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

from unetseg_engine.evaluate import _select_cases, match_labels
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor
from unetseg_engine.metrics import label_metrics
from unetseg_engine.modelpkg import get_model
from unetseg_engine.review import CONFIDENCE_MEASURE, MEASURES
from unetseg_engine.train.dataset import load_dataset


def mirrored(image: sitk.Image) -> sitk.Image:
    """The scan flipped left-right in its voxels, with its header (direction) NOT updated."""
    array = sitk.GetArrayFromImage(image)[:, :, ::-1].copy()
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model id or folder (default: the default model)")
    parser.add_argument("--dataset", action="append", required=True)
    parser.add_argument("--mirrored", action="store_true", help="also run each case mirrored")
    parser.add_argument("--limit", type=int, help="at most this many cases per dataset (a quick look)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the figure from OUTPUT's pairs.csv and summary.json")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    out = Path(args.output)
    if args.replot:
        return replot(out)
    out.mkdir(parents=True, exist_ok=True)
    package = get_model(args.model)
    predictor = Predictor(device="cpu", runtime="torch")
    predictor.load(package)
    labels = {label["value"]: label["name"] for label in package.labels}
    rows, clean_flags, mirror_cases, review_s, total_s = [], [], [], [], []
    for folder in args.dataset:
        dataset = load_dataset(folder)
        ref_values = match_labels(labels, dataset.labels, package.id, folder)
        cases = _select_cases(dataset, package.meta.get("training", {}), "validation")[:args.limit]
        for case in cases:
            image = read_image(case.images[0])
            ref_image = sitk.ReadImage(str(case.label))  # kept: the view below needs it alive
            ref = sitk.GetArrayViewFromImage(ref_image)
            t = time.perf_counter()
            result = predictor.predict([image])
            total_s.append(time.perf_counter() - t)
            review_s.append(result.timings["review_s"])
            pred = sitk.GetArrayViewFromImage(result.label_map)
            spacing = result.label_map.GetSpacing()[::-1]
            for entry in result.review:
                name = entry["name"]
                contoured = case.labelled is None or ref_values[name] in case.labelled
                ref_ml = float((ref == ref_values[name]).sum() * np.prod(spacing) / 1000) \
                    if contoured else None
                clean_flags.append({"case": case.name, "label": name, "reference_ml": ref_ml,
                                    "volume_ml": entry["volume_ml"],
                                    "flags": [f["code"] for f in entry["flags"]]})
                if not contoured:
                    continue  # not contoured in this case: no Dice to compare with
                dice = label_metrics(pred == entry["value"], ref == ref_values[name], spacing)["dice"]
                if math.isnan(dice):  # neither drew it
                    continue
                rows.append({"dataset": dataset.root.name, "case": case.name, "label": name,
                             "dice": dice, "volume_ml": entry["volume_ml"],
                             **{m: entry["measures"].get(m, 0.0) for m in MEASURES}})
            if args.mirrored:
                flipped = predictor.predict([mirrored(image)])
                codes = {e["name"]: [f["code"] for f in e["flags"]] for e in flipped.review}
                mirror_cases.append({"case": case.name, "flags": codes,
                                     "caught": any("left_right_swapped" in c for c in codes.values())})
                # the flip's agreement, as flip test-time augmentation would see it: the mirrored
                # scan's labels mirrored back (left/right pair values swapped) against the original's
                back = sitk.GetArrayFromImage(flipped.label_map)[:, :, ::-1]
                swap = np.arange(max(labels) + 1)
                for pair in package.meta.get("review", {}).get("left_right_pairs", []):
                    a, b = (next(v for v, n in labels.items() if n == pair[k]) for k in ("right", "left"))
                    swap[a], swap[b] = b, a
                back = swap[back]
                for row in rows:
                    if row["case"] == case.name and row["dataset"] == dataset.root.name:
                        value = next(v for v, n in labels.items() if n == row["label"])
                        agreement = label_metrics(pred == value, back == value, spacing)["dice"]
                        row["flip_agreement"] = 0.0 if math.isnan(agreement) else agreement
            print(f"{case.name}: {len(rows)} pairs so far", flush=True)

    summary: dict = {"model": package.id, "version": package.meta["version"], "pairs": len(rows),
                     "cases": len({(r["dataset"], r["case"]) for r in rows}), "spearman": {},
                     "chosen": CONFIDENCE_MEASURE,
                     "review_s_mean": float(np.mean(review_s)), "predict_s_mean": float(np.mean(total_s))}
    dice = np.array([r["dice"] for r in rows])
    for m in MEASURES + (("flip_agreement",) if args.mirrored else ()):
        rho, p = spearmanr([r[m] for r in rows], dice)
        summary["spearman"][m] = {"rho": round(float(rho), 4), "p": float(p)}
    flagged = [f for f in clean_flags if f["flags"]]
    summary["clean"] = {"labels": len(clean_flags), "flagged_labels": len(flagged),
                        "cases_with_a_flag": len({f["case"] for f in flagged}),
                        "cases": len({f["case"] for f in clean_flags}), "flagged": flagged}
    if mirror_cases:
        summary["mirrored"] = {"cases": len(mirror_cases),
                               "caught": sum(c["caught"] for c in mirror_cases), "runs": mirror_cases}
    with open(out / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(rows, summary, out / "confidence_vs_dice.png")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("clean", "mirrored")}, indent=2))
    print(f"clean scans: {summary['clean']['flagged_labels']} flagged labels in "
          f"{summary['clean']['cases_with_a_flag']} of {summary['clean']['cases']} cases")
    if mirror_cases:
        print(f"mirrored scans: left_right_swapped on {summary['mirrored']['caught']} of {len(mirror_cases)}")
    return 0


def replot(out: Path) -> int:
    with open(out / "pairs.csv") as f:
        rows = [{k: v if k in ("dataset", "case", "label") else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)]
    summary = json.loads((out / "summary.json").read_text())
    summary["chosen"] = CONFIDENCE_MEASURE
    plot(rows, summary, out / "confidence_vs_dice.png")
    return 0


def plot(rows, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = summary["chosen"]
    names = sorted({r["label"] for r in rows})
    fig, (ax, bar) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        sel = [r for r in rows if r["label"] == name]
        ax.scatter([r[measure] for r in sel], [r["dice"] for r in sel], s=16, color=cmap(i), label=name)
    rho = summary["spearman"][measure]["rho"]
    ax.set_xlabel(f"confidence ({measure})")
    ax.set_ylabel("Dice against the clinical contour")
    ax.set_title(f"{summary['model']} {summary['version']}: {summary['pairs']} (patient, organ) pairs, "
                 f"{summary['cases']} validation patients\nSpearman {rho:.2f}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    ms = list(summary["spearman"])
    bar.barh(ms, [summary["spearman"][m]["rho"] for m in ms],
             color=["tab:green" if m == measure else "tab:gray" for m in ms])
    bar.axvline(0.5, color="k", lw=0.8, ls="--")
    bar.set_xlabel("Spearman with Dice")
    bar.set_title("candidate measures", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
