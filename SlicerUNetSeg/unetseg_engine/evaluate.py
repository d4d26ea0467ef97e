"""``unetseg evaluate``: per-case, per-label Dice, IoU, HD95, surface Dice at 2 mm, added path length
and volume difference (see ``metrics``).

Either runs a model over cases of an nnU-Net dataset (on each scan's own grid, the way a user gets the
result), or compares two folders of label maps with matching file names. Writes ``metrics.csv``,
``metrics.json`` (cases and summary), a table on the terminal, and overlay PNGs of the worst cases.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import CancelledError, UNetSegError
from .imageio import grid_differences
from .metrics import label_metrics

METRICS = ("dice", "iou", "hd95_mm", "surface_dice", "apl_mm", "volume_diff_ml")


def compare_label_maps(pred: sitk.Image, ref: sitk.Image, labels: dict[int, str],
                       ref_values: dict[str, int] | None = None, what: str = "") -> dict[str, dict]:
    """Metrics per label name for two label maps on the same grid (size, spacing, origin, direction).

    ``labels`` maps the prediction's values to names; ``ref_values`` gives each name's value in the
    reference when its numbering differs (a dataset's labels are matched to a model's by name).
    """
    differences = grid_differences(pred, ref)
    if differences:
        raise UNetSegError(f"{what}The prediction and the reference are on different grids "
                           f"({'; '.join(differences)}), so voxels would be compared at different places; "
                           "resample the prediction onto the reference first.")
    p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
    spacing_zyx = ref.GetSpacing()[::-1]
    ref_values = ref_values or {name: value for value, name in labels.items()}
    return {name: label_metrics(p == value, r == ref_values[name], spacing_zyx)
            for value, name in labels.items()}


def match_labels(model_labels: dict[int, str], reference_labels: dict[str, int], model: str,
                 reference: str) -> dict[str, int]:
    """Each model label's value in the reference, matched by name; refuses names the reference lacks
    (scoring "RightParotid" against whatever has its value elsewhere means nothing)."""
    missing = [name for name in model_labels.values() if name not in reference_labels]
    if missing:
        raise UNetSegError(f"The labels of {model} ({', '.join(model_labels.values())}) do not match "
                           f"those of {reference} ({', '.join(reference_labels) or 'none'}): "
                           f"{', '.join(missing)} not found. Evaluate a model on a dataset of the same "
                           "structures, with the same label names.")
    return {name: reference_labels[name] for name in model_labels.values()}


def summarize(cases: list[dict[str, Any]], label_names: list[str]) -> dict[str, Any]:
    """Mean and standard deviation per label and metric; NaN HD95 (one mask empty) is left out."""
    summary: dict[str, Any] = {"per_label": {}, "n_cases": len(cases)}
    for name in label_names:
        entry = {}
        for metric in METRICS:
            values = np.array([c["labels"][name][metric] for c in cases], dtype=float)
            finite = values[np.isfinite(values)]
            entry[metric] = float(finite.mean()) if finite.size else float("nan")
            entry[metric + "_std"] = float(finite.std()) if finite.size else float("nan")
        summary["per_label"][name] = entry
    dices = [summary["per_label"][n]["dice"] for n in label_names]
    summary["mean_dice"] = float(np.mean(dices))
    summary["min_dice"] = float(np.min(dices))
    summary["mean_hd95_mm"] = float(np.nanmean([summary["per_label"][n]["hd95_mm"]
                                                for n in label_names]))
    return summary


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'label':<16}{'Dice':>8}{'IoU':>8}{'HD95 mm':>10}{'SDice2mm':>10}{'APL mm':>10}"
          f"{'dVol ml':>10}")
    for name, m in summary["per_label"].items():
        print(f"{name:<16}{m['dice']:>8.3f}{m['iou']:>8.3f}{m['hd95_mm']:>10.2f}"
              f"{m['surface_dice']:>10.3f}{m['apl_mm']:>10.1f}{m['volume_diff_ml']:>10.2f}")
    print(f"{'mean':<16}{summary['mean_dice']:>8.3f}{'':>8}{summary['mean_hd95_mm']:>10.2f}"
          f"   ({summary['n_cases']} cases)")


def write_reports(out: Path, cases: list[dict[str, Any]], summary: dict[str, Any],
                  extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", *METRICS, "volume_pred_ml", "volume_ref_ml"])
        for case in cases:
            for name, m in case["labels"].items():
                writer.writerow([case["case"], name, *[_fmt(m[k]) for k in METRICS],
                                 _fmt(m["volume_pred_ml"]), _fmt(m["volume_ref_ml"])])
    payload = {**extra, "summary": summary, "cases": cases}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, allow_nan=False))


def _fmt(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"  # null: not contoured


def _json_safe(obj):
    """NaN is not JSON: write it as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def overlay_png(path: Path, image: sitk.Image, pred: sitk.Image, ref: sitk.Image,
                labels: dict[int, tuple[str, list[int]]], title: str,
                window: tuple[float, float] | None) -> None:
    """Axial, coronal and sagittal slices through the reference's centre: reference contours as
    solid lines, prediction as dashed lines, one colour per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = sitk.GetArrayViewFromImage(image).astype(np.float32)
    p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
    level, width = window or (float(np.percentile(img, 50)), float(np.ptp(img)) or 1.0)
    centre = [int(np.mean(np.nonzero(r > 0)[a])) if (r > 0).any() else img.shape[a] // 2
              for a in range(3)]
    sz, sy, sx = image.GetSpacing()[::-1]
    # superior at the top: flip the rows when k runs towards superior (LPS z > 0)
    up = slice(None, None, -1) if image.GetDirection()[8] > 0 else slice(None)
    views = [("axial", lambda a: a[centre[0]], sy / sx),
             ("coronal", lambda a: a[:, centre[1], :][up], sz / sx),
             ("sagittal", lambda a: a[:, :, centre[2]][up], sz / sy)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, cut, aspect) in zip(axes, views):
        ax.imshow(cut(img), cmap="gray", vmin=level - width / 2, vmax=level + width / 2, aspect=aspect)
        for value, (label_name, color) in labels.items():
            c = np.array(color) / 255.0
            if (cut(r) == value).any():
                ax.contour(cut(r) == value, levels=[0.5], colors=[c], linewidths=1.2)
            if (cut(p) == value).any():
                ax.contour(cut(p) == value, levels=[0.5], colors=[c], linewidths=1.2,
                           linestyles="dashed")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title}  (solid: reference, dashed: prediction)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate_model(model: str | None, dataset_dir: str, cases_sel: str, out: Path, device: str = "auto",
                   tta: bool = False, worst: int = 3, runtime: str = "auto",
                   progress: Callable[[float], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run a model over dataset cases and compare with their reference labels.

    ``progress(fraction of the cases done)``; ``cancel()`` returning True stops between and inside
    cases with CancelledError, before any report is written."""
    from .imageio import read_image
    from .inference import Predictor
    from .modelpkg import get_model
    from .train.dataset import load_dataset

    package = get_model(model)
    dataset = load_dataset(dataset_dir)
    chosen = _select_cases(dataset, package.meta.get("training", {}), cases_sel)
    seen = sorted({c.name for c in chosen} & set(package.meta.get("training", {}).get("train_cases", [])))
    if seen and cases_sel != "train":
        print(f"Warning: {len(seen)} of these {len(chosen)} cases were used to train the model "
              f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}); their figures are "
              "optimistic.", flush=True)
    labels = {label["value"]: label["name"] for label in package.labels}
    ref_values = match_labels(labels, dataset.labels, f"model '{package.id}'",
                              f"the dataset {dataset.root}")
    predictor = Predictor(device=device, tta=tta, runtime=runtime)
    predictor.load(package)
    results: list[dict[str, Any]] = []
    kept: list[tuple[sitk.Image, sitk.Image, sitk.Image]] = []  # input, prediction, reference
    for index, case in enumerate(chosen):
        if cancel is not None and cancel():
            raise CancelledError("Evaluation was cancelled.")
        images = [read_image(p) for p in case.images]
        ref = sitk.ReadImage(str(case.label))
        result = predictor.predict(images, cancel=cancel)
        if progress is not None:
            progress((index + 1) / len(chosen))
        metrics = compare_label_maps(result.label_map, ref, labels, ref_values, f"Case '{case.name}': ")
        for name in labels.values():  # a partially contoured case: judge only what was drawn
            if case.labelled is not None and ref_values[name] not in case.labelled:
                metrics[name] = {key: math.nan for key in metrics[name]}
        results.append({"case": case.name, "labels": metrics,
                        "mean_dice": float(np.nanmean([m["dice"] for m in metrics.values()])),
                        "timings": result.timings})
        kept.append((images[0], result.label_map, ref))
        print(f"{case.name}: mean Dice {results[-1]['mean_dice']:.3f}", flush=True)
    summary = summarize(results, list(labels.values()))
    norm = package.meta["preprocessing"]["normalization"]
    window = (norm["level"], norm["width"]) if norm["method"] == "ct_window" else None
    order = np.argsort([r["mean_dice"] for r in results])[:worst]
    colours = {label["value"]: (label["name"], label["color"]) for label in package.labels}
    out.mkdir(parents=True, exist_ok=True)
    for i in order:
        image, pred, ref = kept[i]
        overlay_png(out / f"worst_{results[i]['case']}.png", image, pred, ref, colours,
                    f"{results[i]['case']}: mean Dice {results[i]['mean_dice']:.3f}", window)
    extra = {"model": package.id, "model_version": package.meta["version"], "dataset": str(dataset_dir),
             "device": predictor.device, "tta": tta, "cases_seen_in_training": seen}
    write_reports(out, _json_safe(results), _json_safe(summary), extra)
    return {"summary": summary, "cases": results, "package": package}


def _select_cases(dataset, training: dict[str, Any], cases_sel: str) -> list:
    """The cases named by ``--cases``. 'validation' ('train') means the cases the model was validated
    (trained) on when its metadata lists them and the dataset has them all, so a model trained on
    another fold or split is judged on what it has not seen; else the dataset's own split."""
    by_name = {c.name: c for c in dataset.cases}
    if cases_sel in ("validation", "train"):
        # a model trained on several datasets records all their cases: take this dataset's
        recorded = [name for name in training.get(f"{cases_sel}_cases") or [] if name in by_name]
        if recorded:
            return [by_name[name] for name in recorded]
    train, val = dataset.split()
    chosen = {"validation": val, "train": train, "all": dataset.cases}.get(cases_sel)
    if chosen is None:
        names = [name for name in cases_sel.split(",") if name]
        missing = sorted(set(names) - set(by_name))
        if missing or not names:
            raise UNetSegError(f"Unknown case(s) {missing} in {dataset.root}; --cases takes "
                               "'validation', 'train', 'all' or case names separated by commas.")
        chosen = [by_name[name] for name in names]
    return chosen


def evaluate_folders(pred_dir: str, ref_dir: str, out: Path, model: str | None) -> dict[str, Any]:
    """Compare label maps with the same file names in two folders."""
    pred_dir_p, ref_dir_p = Path(pred_dir), Path(ref_dir)
    refs = sorted(p for p in ref_dir_p.iterdir() if p.name.endswith((".nii.gz", ".nii", ".nrrd",
                                                                     ".mha")))
    if not refs:
        raise UNetSegError(f"No label maps (.nii.gz, .nrrd, .mha) in '{ref_dir}'.")
    ref_values = None
    if model:
        from .modelpkg import get_model

        package = get_model(model)
        labels = {label["value"]: label["name"] for label in package.labels}
        dataset_json = ref_dir_p.resolve().parent / "dataset.json"
        if dataset_json.is_file():  # references in an nnU-Net labelsTr/: their names are known
            from .train.checks import dataset_labels

            ref_values = match_labels(labels, dataset_labels(dataset_json.parent),
                                      f"model '{package.id}'", str(dataset_json))
    else:
        values = set()
        for p in refs:
            values |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(p)))).tolist())
        labels = {int(v): f"label_{int(v)}" for v in sorted(values) if v != 0}
    results = []
    for ref_path in refs:
        pred_path = pred_dir_p / ref_path.name
        if not pred_path.is_file():
            raise UNetSegError(f"No prediction '{ref_path.name}' in '{pred_dir}' for the reference of "
                               "the same name.")
        metrics = compare_label_maps(sitk.ReadImage(str(pred_path)), sitk.ReadImage(str(ref_path)),
                                     labels, ref_values, f"'{ref_path.name}': ")
        name = ref_path.name.split(".")[0]
        results.append({"case": name, "labels": metrics,
                        "mean_dice": float(np.mean([m["dice"] for m in metrics.values()]))})
    summary = summarize(results, list(labels.values()))
    write_reports(out, _json_safe(results), _json_safe(summary), {"pred": pred_dir, "ref": ref_dir})
    return {"summary": summary, "cases": results}


def evaluate_cli(args) -> int:
    out = Path(args.output)
    if args.pred or args.ref:
        if not (args.pred and args.ref):
            raise UNetSegError("Give both --pred and --ref folders to compare label maps.")
        report = evaluate_folders(args.pred, args.ref, out, args.model)
    else:
        if not args.dataset:
            raise UNetSegError("Give --dataset (with --model) or --pred and --ref.")
        report = evaluate_model(args.model, args.dataset, args.cases, out, args.device, args.tta,
                                args.worst)
        if args.write_performance:
            write_performance(report, args.dataset, args.cases, args.tta)
    print_table(report["summary"])
    print(f"Wrote {out / 'metrics.csv'} and {out / 'metrics.json'}")
    return 0


def write_performance(report: dict[str, Any], dataset: str, cases: str, tta: bool) -> None:
    """Record measured accuracy in the model's metadata (the weights, and so the checksum, stay)."""
    import platform

    from .modelpkg import METADATA_FILE
    from .outputs import atomic_write

    package = report["package"]
    s = report["summary"]
    meta = dict(package.meta)
    meta["performance"] = {
        "summary": f"mean Dice {s['mean_dice']:.3f} (min {s['min_dice']:.3f}) on {s['n_cases']} "
                   f"{cases} cases",
        "dataset": Path(dataset).name, "cases": [c["case"] for c in report["cases"]],
        "method": "unetseg evaluate: full pipeline on each scan's own grid against the clinical "
                  "contours; Dice/IoU/HD95 (mm)/volume difference (ml) per label, mean over cases"
                  + (", flip TTA" if tta else ""),
        "per_label": _json_safe({n: {k: round(v, 4) for k, v in m.items() if not k.endswith("_std")}
                                 for n, m in s["per_label"].items()}),
        "mean_dice": round(s["mean_dice"], 4), "mean_hd95_mm": round(s["mean_hd95_mm"], 2),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    path = package.path / METADATA_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    print(f"Recorded the measured performance in {path}")
