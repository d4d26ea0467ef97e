"""The ``unetseg`` command line: models, segment, batch, serve, submit, import-model, ensemble, train,
finetune, versions, evaluate and more.

The others: benchmark, model-stats, quantize.

Errors the user can fix print one line (``unetseg: error: ...``) and exit with status 2; nothing is
written in that case.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .checks import check_settings
from .errors import UNetSegError
from .runtimes import RUNTIME_CHOICES


def _window(text: str | None):
    if text is None:
        return None
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise UNetSegError(f"--window takes LEVEL,WIDTH in HU (e.g. 40,400), not '{text}'.") from None
    check_settings(window=(level, width))
    return level, width


def _base_version(model_id: str) -> str | None:
    from .modelpkg import base_package

    base = base_package(model_id)
    return base.meta["version"] if base else None


def cmd_models(args) -> int:
    from .modelpkg import scan_models

    models, skipped = scan_models()
    for path, reason in skipped:  # on stderr, so that --json output stays parseable
        print(f"unetseg: skipped '{path}': {reason}", file=sys.stderr)
    if args.json:
        from .modelversions import list_versions

        print(json.dumps([dict(m.summary(), versions=list_versions(m.id, _base_version(m.id)))
                          for m in models], indent=2))
        return 0
    if not models:
        print("No models found. Search path: see 'unetseg models --help'.")
        return 0
    for m in models:
        s = m.summary()
        window = f", window {s['default_window'][0]:g}/{s['default_window'][1]:g}" \
            if s["default_window"] else ""
        print(f"{s['id']}  v{s['version']}  [{s['modality']}, inputs: {', '.join(s['inputs'])}{window}]")
        print(f"    {s['title']}  (licence: {s['licence']})")
        if s["networks"] > 1:
            print(f"    ensemble of {s['networks']} networks (probabilities averaged; slower)")
        print(f"    labels: {', '.join(s['labels'])}")
        line = _versions_line(m.id, _base_version(m.id))
        if line:
            print(f"    {line}  (unetseg versions {m.id})")
        if s["performance"]:
            print(f"    measured: {s['performance']}")
    return 0


def _versions_line(model_id: str, base_version: str | None) -> str | None:
    """'versions: 1.2.0 (base), 1.2.1 (fine-tuned, active)' when the model has fine-tuned versions."""
    from .modelversions import list_versions

    versions = list_versions(model_id, base_version)
    if len(versions) < 2:
        return None
    return "versions: " + ", ".join(f"{v['version']} ({v['kind']}{', active' if v['active'] else ''})"
                                    for v in versions)


def cmd_versions(args) -> int:
    from .modelpkg import base_package, get_model
    from .modelversions import list_versions, restore_version

    current = get_model(args.model)  # refuses an unknown id, naming the known ones
    base = base_package(current.id)
    base_version = base.meta["version"] if base else None
    if args.restore is not None:
        now = restore_version(current.id, args.restore or None, base_version)
        print(f"'{current.id}' is now at version {now} (was {current.meta['version']}).")
        return 0
    versions = list_versions(current.id, base_version)
    if args.json:
        print(json.dumps(versions, indent=2))
        return 0
    for v in versions:
        figures = f"  mean Dice {v['old_mean_dice']:.3f} -> {v['new_mean_dice']:.3f} on " \
                  f"{len(v.get('held_out_cases', []))} held-out case(s) ({v.get('held_out')})" \
            if v["kind"] == "fine-tuned" else ""
        origin = f"  from {v['parent']}, {v.get('installed', '')}" if v["kind"] == "fine-tuned" else ""
        print(f"{'*' if v['active'] else ' '} {v['version']}  {v['kind']}{origin}{figures}")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import FinetuneSettings, finetune, print_gate

    settings = FinetuneSettings(**{k: v for k, v in vars(args).items() if v is not None and k in
                                   FinetuneSettings.__annotations__})
    if isinstance(settings.patch_size, str):
        settings.patch_size = _axes("patch_size", settings.patch_size)
    result = finetune(args.model, args.dataset, args.output, settings,
                      validation_dataset=args.validation_dataset)
    print_gate(result.gate)
    print(f"Figures and the candidate package: {Path(args.output) / 'finetune.json'}")
    return 0 if result.accepted else 1


def cmd_import(args) -> int:
    from pathlib import Path

    from .modelpkg import import_model

    source = Path(args.package)
    if source.is_dir() and (source / "plans.json").is_file() and (source / "dataset.json").is_file():
        from .nnunet import ask_licence, import_nnunet  # an nnU-Net v2 trained-model folder

        folds = [int(f) for f in args.folds.split(",")] if args.folds else None
        package = import_nnunet(source, args.licence or ask_licence(source), folds=folds,
                                model_id=args.model_id, overwrite=args.overwrite)
        print(f"Imported nnU-Net model '{package.id}' ({len(package.weight_files)} fold(s)) to "
              f"{package.path}")
        return 0
    if args.folds or args.licence or args.model_id:
        raise UNetSegError("--folds, --licence and --model-id are for nnU-Net folders (with "
                           "plans.json and dataset.json); a model package carries its own.")
    package = import_model(args.package, overwrite=args.overwrite)
    print(f"Installed model '{package.id}' v{package.meta['version']} to {package.path}")
    return 0


def cmd_segment(args) -> int:
    from .pipeline import segment_files

    segment_files(args.inputs, args.output, model=args.model, device=args.device,
                  window=_window(args.window), overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                  tta=args.tta, postprocess=not args.no_postprocess, quiet=args.quiet,
                  output_type=args.output_type, runtime=args.runtime, uncertainty=args.uncertainty,
                  review_json=args.review_json, mirror=not args.no_mirror)
    return 0


def cmd_model_stats(args) -> int:
    from .review import add_statistics

    datasets = [args.dataset, *(args.extra_datasets or [])]
    path = add_statistics(args.model, datasets, all_cases=args.all_cases,
                          progress=None if args.quiet else lambda name: print(f"  {name}", flush=True))
    meta = json.loads(Path(path).read_text())["review"]
    print(f"Recorded training-label statistics of {meta['source']['cases']} cases in {path}")
    for name, s in meta["labels"].items():
        v = s["volume_ml"]
        print(f"  {name}: {v['min']:.1f}-{v['max']:.1f} ml (median {v['median']:.1f}), present in "
              f"{s['present_fraction']:.0%}, at most {s['components_max']} large piece(s)")
    pairs = ", ".join(f"{p['right']}/{p['left']}" for p in meta["left_right_pairs"]) or "none"
    print(f"  left/right pairs: {pairs}")
    return 0


def cmd_batch(args) -> int:
    from .batch import batch_cli

    return batch_cli(args)


def cmd_ensemble(args) -> int:
    from .modelpkg import get_model, write_ensemble

    members = [get_model(m) for m in args.models]
    package = write_ensemble(args.output, members, args.model_id, version=args.version,
                             title=args.title, half=args.half)
    size_mb = package.weights_bytes / 1e6
    print(f"Ensemble '{package.id}' of {len(package.weight_files)} networks written to {package.path} "
          f"({size_mb:.1f} MB of weights). Measure it with: unetseg evaluate --model {package.path} "
          "--dataset DATASET --write-performance")
    return 0


def _axes(key: str, text: str) -> list:
    """--spacing / --patch-size / --flip-axes: three numbers x,y,z, or axis names."""
    type_ = {"spacing": float, "patch_size": int}.get(key, str)
    try:
        values = [type_(v) for v in text.split(",")]
    except ValueError:
        values = []
    if type_ is not str and len(values) != 3:
        raise UNetSegError(f"--{key.replace('_', '-')} takes three {type_.__name__} values x,y,z, "
                           f"not '{text}'.")
    return values


def cmd_train(args) -> int:
    from .train.checks import check_arguments, check_dataset
    from .train.trainer import TrainConfig, Trainer

    recipe = json.loads(Path(args.recipe).read_text()) if args.recipe else {}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__annotations__}
    settings = {**recipe, **overrides}
    if "window" in settings and isinstance(settings["window"], str):
        settings["window"] = _window(settings["window"])
    if isinstance(settings.get("mirror_pairs"), str):  # "RightParotid:LeftParotid,A:B"
        settings["mirror_pairs"] = [pair.split(":") for pair in settings["mirror_pairs"].split(",")]
    for key in ("spacing", "patch_size", "flip_axes"):
        if isinstance(settings.get(key), str):
            settings[key] = _axes(key, settings[key])
    # Everything that can be checked is checked before the first iteration (and before the run
    # folder is made): hours of training must not end in a refusal.
    check_arguments(settings)
    for folder in [args.dataset, *(settings.get("extra_datasets") or [])]:
        check_dataset(folder)
    settings["dataset"], settings["output"] = Path(args.dataset), Path(args.output)
    package = Trainer(TrainConfig(**settings)).run()
    print(f"Model package: {package}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_cli

    return evaluate_cli(args)


def cmd_benchmark(args) -> int:
    if args.against == "nnunet":  # nnU-Net's own predictor vs ours on an nnU-Net folder
        from .nnunetbench import benchmark_cli as nnunet_benchmark

        return nnunet_benchmark(args)
    from .benchmark import benchmark_cli

    return benchmark_cli(args)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a segmentation run, shared by ``segment`` and ``batch``."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--window", help="CT window LEVEL,WIDTH in HU, overriding the model's for this run")
    p.add_argument("--overlap", type=float, help="sliding-window overlap (0-1, default: the model's)")
    p.add_argument("--sw-batch-size", type=int, help="windows per network call")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (slower)")
    p.add_argument("--no-postprocess", action="store_true", help="skip the model's postprocessing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the available models")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("segment", help="segment a scan (NIfTI/NRRD/MHA file or DICOM folder)")
    p.add_argument("inputs", nargs="+", help="input volume(s); one per model input channel")
    p.add_argument("-o", "--output", required=True,
                   help="output: .nii.gz/.nrrd/.mha label map, .seg.nrrd Slicer segmentation, or .dcm "
                        "DICOM SEG (needs a DICOM series as input)")
    p.add_argument("--output-type", dest="output_type", choices=["seg.nrrd", "nii.gz", "nrrd", "mha",
                                                                  "dicom-seg"],
                   help="what to write (default: from the output's name)")
    p.add_argument("--model", help="model id or package folder (default: the shipped default model)")
    p.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                   help="what runs the network on the CPU (auto: the fastest installed float32 one, "
                        "measured once; openvino-int8: the model's int8 graph, if 'unetseg quantize' "
                        "added one; openvino-bf16: OpenVINO at bfloat16 on CPUs with native "
                        "bfloat16, 2x faster for large networks such as nnU-Net's)")
    p.add_argument("--uncertainty", help="also write the voxel uncertainty map (uint8, 0 certain .. 255 "
                                         "uniform; .nrrd/.nii.gz/.mha) on the input's grid")
    p.add_argument("--review-json", dest="review_json",
                   help="write the review (per label volume, confidence, flags, focus point) as JSON")
    p.add_argument("--no-mirror", dest="no_mirror", action="store_true",
                   help="nnU-Net models: skip mirroring over the checkpoint's axes (on by default, as "
                   "in nnU-Net; about 8 times faster)")
    add_run_options(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("model-stats", help="record training-label statistics (volume range, position, "
                                           "pieces, left/right pairs) in a model's metadata, for the "
                                           "plausibility flags")
    p.add_argument("model", help="model package folder (or id)")
    p.add_argument("--dataset", required=True, help="nnU-Net dataset folder the model was trained on")
    p.add_argument("--extra-dataset", dest="extra_datasets", action="append",
                   help="another one (partial_labels honoured: only contoured organs count); repeatable")
    p.add_argument("--all-cases", action="store_true",
                   help="use every case, not only the model's recorded training cases")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_model_stats)

    p = sub.add_parser("batch", help="segment every scan under a folder (files and DICOM series) with "
                                      "one loaded model; resumable, with a summary CSV")
    p.add_argument("input_root", help="folder searched recursively: NIfTI/NRRD/MHA files, DICOM series")
    p.add_argument("-o", "--output", required=True, help="output root: a folder per scan, summary.csv")
    p.add_argument("--model", help="model id or package folder (default: the shipped default model)")
    p.add_argument("--modality", help="DICOM series to take (default: the model's modality; 'any')")
    p.add_argument("--output-type", dest="output_type", default="seg.nrrd",
                   choices=["seg.nrrd", "nii.gz", "dicom-seg"])
    p.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                   help="what runs the network on the CPU, as for segment (auto: the fastest, measured "
                        "once per machine; give one, e.g. torch, for the same labels on every machine "
                        "of a cluster)")
    p.add_argument("--cluster", metavar="tcp://HOST:PORT",
                   help="spread the studies over the workers of this Dask scheduler (they must see "
                        "the same paths: a shared filesystem; pip install \".[cluster]\")")
    add_run_options(p)
    p.set_defaults(func=cmd_batch)

    from .server.command import add_serve_parser, add_submit_parser

    add_serve_parser(sub)
    add_submit_parser(sub)

    p = sub.add_parser("import-model", help="validate a model package (folder or .zip), or convert an "
                       "nnU-Net v2 trained-model folder, and install it")
    p.add_argument("package", help="package folder or .zip, or an nnU-Net folder "
                   "<Trainer>__<Plans>__<configuration> (dataset.json, plans.json, fold_*/)")
    p.add_argument("--folds", help="nnU-Net: folds to ensemble, e.g. 0,1 (default: every fold present)")
    p.add_argument("--licence", help="nnU-Net: the model's licence (nnU-Net folders carry none; asked "
                   "on a terminal, required otherwise)")
    p.add_argument("--model-id", dest="model_id", help="nnU-Net: id of the package (default: from "
                   "dataset.json's name and the configuration)")
    p.add_argument("--overwrite", action="store_true", help="replace an installed model of the same id")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ensemble", help="combine models trained with the same plan into one package "
                                         "that averages their probabilities")
    p.add_argument("models", nargs="+", help="two or more model ids or package folders")
    p.add_argument("-o", "--output", required=True, help="new package folder")
    p.add_argument("--model-id", dest="model_id", required=True, help="id of the ensemble")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--title")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the size; inference stays float32)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("train", help="train a model on an nnU-Net v2 dataset folder")
    p.add_argument("dataset", help="folder with dataset.json, imagesTr/, labelsTr/ (splits.json optional)")
    p.add_argument("-o", "--output", required=True, help="run folder (checkpoint, curves, model/)")
    p.add_argument("--recipe", help="JSON file with any of the options below (options win)")
    p.add_argument("--model-id", dest="model_id")
    p.add_argument("--version", help="version of the exported package (default 1.0.0)")
    p.add_argument("--title")
    p.add_argument("--architecture", choices=["UNet", "BasicUNet", "BasicUNetPlusPlus",
                                              "AttentionUnet", "VNet", "DynUNet", "SegResNet"])
    p.add_argument("--spatial-dims", dest="spatial_dims", type=int, choices=[2, 3])
    p.add_argument("--loss", choices=["dice_ce", "dice_focal", "bce_dice"])
    p.add_argument("--iterations", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--learning-rate", dest="learning_rate", type=float)
    p.add_argument("--val-every", dest="val_every", type=int)
    p.add_argument("--val-fraction", dest="val_fraction", type=float,
                   help="validation fraction when the dataset has no splits.json")
    p.add_argument("--fold", type=int, help="cross-validation fold to hold out: one of splits.json's "
                   "list of folds (nnU-Net's splits_final.json), or of --n-folds seeded folds")
    p.add_argument("--n-folds", dest="n_folds", type=int, help="folds when there is no splits file "
                   "(default 5)")
    p.add_argument("--seed", type=int, help="initialisation and sampling (the split never follows it)")
    p.add_argument("--spacing", help="x,y,z in mm (default: planned from the data)")
    p.add_argument("--patch-size", dest="patch_size", help="x,y,z in voxels (default: planned)")
    p.add_argument("--window", help="CT window LEVEL,WIDTH (default: from label intensities)")
    p.add_argument("--base-features", dest="base_features", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--elastic", action="store_true", default=None, help="add elastic deformation")
    p.add_argument("--coarse-dropout", dest="coarse_dropout", action="store_true", default=None)
    p.add_argument("--flip-axes", dest="flip_axes", help="e.g. y,z (never x for left/right labels)")
    p.add_argument("--mirror-pairs", dest="mirror_pairs",
                   help="left/right label pairs to swap in a left-right mirror augmentation, e.g. "
                        "RightParotid:LeftParotid (also used for --tta)")
    p.add_argument("--time-limit-min", dest="time_limit_min", type=float,
                   help="stop (validate, checkpoint, export) after this many minutes")
    p.add_argument("--swa-start", dest="swa_start", type=float,
                   help="stochastic weight averaging: from this fraction of the run (e.g. 0.5), hold "
                        "the learning rate and export the average of snapshots")
    p.add_argument("--swa-every", dest="swa_every", type=int,
                   help="iterations between averaged snapshots (default 25)")
    p.add_argument("--num-threads", dest="num_threads", type=int)
    p.add_argument("--extra-dataset", dest="extra_datasets", action="append",
                   help="another dataset folder with the same labels, often partially contoured "
                        "(partial_labels in its dataset.json); repeat for more. Split by its own "
                        "splits file or, without one, holding out --val-fraction of its cases")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="CPU arithmetic: bf16 autocast where the CPU has native bfloat16 (auto, the "
                        "default), else fp32; CUDA always uses float16 autocast")
    p.add_argument("--sampling", choices=["classes", "balanced"],
                   help="patch centres: 'classes' (default) or 'balanced' (each organ as often as "
                        "the others, from the cases that contoured it)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from checkpoint.pt")
    p.add_argument("--init-from", dest="init_from",
                   help="start from an existing model package (id or folder): its plan and weights")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a model on corrected cases; install it as a new "
                                         "version only if it is not worse on held-out cases")
    p.add_argument("dataset", help="nnU-Net dataset of corrected cases (partial_labels: reviewed organs)")
    p.add_argument("--model", help="model id or package folder (default: the default model)")
    p.add_argument("-o", "--output", required=True, help="new run folder (training, evaluations, "
                                                          "candidate package, finetune.json)")
    p.add_argument("--validation-dataset", dest="validation_dataset",
                   help="dataset holding the model's own validation cases, used when yours has too few "
                        "held-out cases (fewer than 2)")
    p.add_argument("--iterations", type=int, help="training iterations (default 200)")
    p.add_argument("--learning-rate", dest="learning_rate", type=float, help="default 1e-4")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--patch-size", dest="patch_size", help="x,y,z training patch (default: the model's)")
    p.add_argument("--mean-tolerance", dest="mean_tolerance", type=float,
                   help="mean Dice may fall by at most this much (default 0.01)")
    p.add_argument("--organ-tolerance", dest="organ_tolerance", type=float,
                   help="no organ's mean Dice may fall by more than this (default 0.05)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--num-threads", dest="num_threads", type=int)
    p.add_argument("--time-limit-min", dest="time_limit_min", type=float)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("versions", help="list a model's versions; --restore goes back to an earlier one")
    p.add_argument("model", help="model id")
    p.add_argument("--restore", nargs="?", const="", metavar="VERSION",
                   help="make VERSION active (default: the version the active one was fine-tuned from)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("evaluate", help="Dice/IoU/HD95/volume per case and label, CSV/JSON/PNGs")
    p.add_argument("--model", help="model to run over a dataset (id or folder)")
    p.add_argument("--dataset", help="nnU-Net dataset folder (with --model)")
    p.add_argument("--cases", default="validation", help="'validation', 'train', 'all' or a,b,c")
    p.add_argument("--pred", help="folder of predicted label maps (instead of --model)")
    p.add_argument("--ref", help="folder of reference label maps (with --pred)")
    p.add_argument("-o", "--output", required=True, help="folder for metrics.csv/json and overlays")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tta", action="store_true")
    p.add_argument("--worst", type=int, default=3, help="overlay PNGs for this many worst cases")
    p.add_argument("--write-performance", action="store_true",
                   help="store the summary in the model's metadata.json (model authors)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quantize", help="add an int8 OpenVINO graph to a model package, if it passes "
                                        "a validation gate (mean Dice -0.005, any organ -0.01 at most)")
    p.add_argument("model", help="model id or package folder (changed in place when accepted)")
    p.add_argument("--dataset", action="append", required=True,
                   help="nnU-Net-layout folder with the model's labels: the first gives the calibration "
                        "(training) cases, every one its validation cases (repeatable)")
    p.add_argument("--calibration-cases", type=int, default=8)
    p.add_argument("--windows-per-case", type=int, default=4)
    p.add_argument("--max-validation-cases", type=int, default=None,
                   help="at most this many validation cases per dataset (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing int8 graph")
    p.set_defaults(func=lambda args: __import__("unetseg_engine.quantize", fromlist=["x"]).quantize_cli(args))

    p = sub.add_parser("benchmark", help="our engine vs the MONAI reference pipeline (or nnU-Net's "
                       "predictor), side by side")
    p.add_argument("--against", choices=["monai", "nnunet"], default="monai",
                   help="nnunet: nnU-Net's nnUNetPredictor and ours on one nnU-Net folder")
    p.add_argument("--nnunet-folder", dest="nnunet_folder", help="with --against nnunet: the trained "
                   "folder (default: nnU-Net's default 3d_fullres plan for OpenKBP, random weights)")
    p.add_argument("--no-mirror", dest="no_mirror", action="store_true",
                   help="with --against nnunet: both without mirroring")
    p.add_argument("--model", help="model id (default: the default model)")
    p.add_argument("--case", default="pt_201", help="OpenKBP case to use")
    p.add_argument("--sizes", default="native,clinical", help="native, clinical (about 512x512x300)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "both"])
    p.add_argument("--skip-reference", action="store_true", help="only time our engine")
    p.add_argument("--runtimes", default="installed",
                   help="our engine on these runtimes, comma-separated (torch, openvino, onnxruntime, "
                        "openvino-int8 (not with --against nnunet), openvino-bf16; "
                        "default: every installed one, and with --against nnunet openvino-bf16 "
                        "where the CPU has bfloat16)")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--threads", type=int, help="CPU threads for both pipelines (default: PyTorch's)")
    p.add_argument("--keep", help="keep the inputs and both label maps in this folder")
    p.add_argument("--reference-runs", dest="reference_runs", type=int,
                   help="runs of the MONAI pipeline per case (default: 2 native, 1 clinical)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="run ours without the model's clean-up rules (the MONAI pipeline has none)")
    p.set_defaults(func=cmd_benchmark)
    return parser


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C: stop the run, and ignore further Ctrl-Cs so the clean-up (removing the temporary
    output, PyTorch's exit handlers) is not cut short with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    own_handler = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_handler:
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        return args.func(args)
    except UNetSegError as error:
        print(f"unetseg: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # also when the interrupt did not come from us
        # a command may say what it kept (batch: the studies finished so far)
        print(f"unetseg: interrupted; {interrupt.args[0] if interrupt.args else 'no output was written.'}",
              file=sys.stderr)
        return 130  # Ctrl-C stays ignored: the process is ending
    finally:
        if own_handler and signal.getsignal(signal.SIGINT) is _interrupt_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # main() called from Python


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
