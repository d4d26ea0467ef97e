"""``unetseg finetune``: learn from corrected cases, and keep the result only if it is not worse.

1. Train from the model's own weights and plan (``train --init-from``) on the user's dataset (nnU-Net
   layout; its ``partial_labels`` list says which organs each case had reviewed, and only those are
   taught: the trainer's marginal loss does not read an unreviewed organ's zeros as background).
2. Evaluate the current model and the fine-tuned one with the full pipeline (each scan on its own
   grid, ``evaluate``), on the same held-out cases, each organ only where it was contoured:
   - the user's held-out cases: the ``validation`` cases of the dataset's ``splits.json``, or, without
     one, a fixed third of the cases once the dataset has ``MIN_CASES_TO_HOLD_OUT`` (6) or more;
   - when that gives fewer than ``MIN_HELD_OUT`` (2) cases ("too few"), every user case is trained on
     and the gate uses the model's own validation cases (its metadata lists them), read from
     ``validation_dataset``, a dataset folder that holds them (for the shipped model, OpenKBP).
3. The gate. The fine-tuned model is **not worse** when, over the organs contoured in at least one
   held-out case, its mean Dice is at most ``mean_tolerance`` (0.01) below the current model's, and no
   organ's mean Dice is more than ``organ_tolerance`` (0.05) below. Then it is installed as the next
   patch version of the same model id (``modelversions``: atomic, the previous version restorable);
   otherwise it is not installed, the reasons are given, and the current model stays.

Everything the run produced stays in its run folder: the training run, both evaluations
(``metrics.csv``/``metrics.json``), the candidate package and ``finetune.json`` with the figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CancelledError, UNetSegError

MIN_HELD_OUT = 2  # fewer user held-out cases than this: "too few", use the model's validation cases
MIN_CASES_TO_HOLD_OUT = 6  # a dataset without splits.json holds out a third from this many cases
MEAN_TOLERANCE = 0.01
ORGAN_TOLERANCE = 0.05

ProgressCallback = Callable[[str, float], None]


@dataclass
class FinetuneSettings:
    iterations: int = 200
    learning_rate: float = 1e-4  # a tenth of the default model's last stage: adapt, don't relearn
    batch_size: int = 2
    patch_size: list[int] | None = None  # x, y, z; default the model's inference window
    device: str = "auto"
    seed: int = 0
    num_threads: int | None = None
    time_limit_min: float | None = None
    mean_tolerance: float = MEAN_TOLERANCE
    organ_tolerance: float = ORGAN_TOLERANCE
    runtime: str = "torch"  # the evaluation's network runtime: the same for both models
    precision: str = "auto"  # training arithmetic on the CPU (see TrainConfig.precision)

    def check(self) -> None:
        problems = []
        if self.iterations < 1:
            problems.append(f"iterations {self.iterations}: at least 1")
        if not 0 < self.learning_rate <= 1:
            problems.append(f"learning rate {self.learning_rate}: above 0, at most 1")
        if self.batch_size < 1:
            problems.append(f"batch size {self.batch_size}: at least 1")
        for name in ("mean_tolerance", "organ_tolerance"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name.replace('_', ' ')} {getattr(self, name)}: from 0 to below 1")
        if problems:
            raise UNetSegError("Fine-tuning settings: " + "; ".join(problems) + ".")


@dataclass
class Gate:
    """The comparison of the two models on the same held-out cases."""

    accepted: bool
    reasons: list[str]
    old_mean_dice: float
    new_mean_dice: float
    per_label: dict[str, dict[str, Any]]  # name -> old, new, delta, n (cases that contoured it)
    cases: list[str]
    held_out: str  # "user" or "model validation"
    mean_tolerance: float
    organ_tolerance: float


@dataclass
class FinetuneResult:
    accepted: bool
    gate: Gate
    model_id: str
    old_version: str
    new_version: str  # the candidate's version (installed only when accepted)
    candidate: Path  # the fine-tuned package in the run folder
    installed: Path | None  # where the new version was installed (None: rejected)
    train_cases: list[str] = field(default_factory=list)
    time_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["candidate"] = str(self.candidate)
        out["installed"] = str(self.installed) if self.installed else None
        return out

    def summary(self) -> str:
        g = self.gate
        verdict = (f"installed as '{self.model_id}' v{self.new_version}" if self.accepted else
                   f"not installed; '{self.model_id}' stays at v{self.old_version}")
        return (f"Fine-tuned model {'accepted' if self.accepted else 'rejected'}: mean Dice "
                f"{g.new_mean_dice:.3f} against {g.old_mean_dice:.3f} for v{self.old_version} on "
                f"{len(g.cases)} held-out case(s) ({g.held_out}); {verdict}."
                + ("" if self.accepted else " " + " ".join(g.reasons)))


def choose_cases(dataset, package, validation_dataset: str | Path | None):
    """(training case names, held-out case names, dataset folder of the held-out cases, source)."""
    from .train.dataset import load_dataset

    has_splits = any((dataset.root / n).is_file() for n in ("splits.json", "splits_final.json"))
    if has_splits or len(dataset.cases) >= MIN_CASES_TO_HOLD_OUT:
        train, held_out = dataset.split(1 / 3)
        if len(held_out) >= MIN_HELD_OUT and train:
            return [c.name for c in train], [c.name for c in held_out], dataset.root, "user"
    names = [c.name for c in dataset.cases]
    recorded = package.meta.get("training", {}).get("validation_cases") or []
    why = (f"the dataset {dataset.root} has {len(dataset.cases)} case(s), too few to hold out "
           f"{MIN_HELD_OUT} (a dataset without splits.json needs {MIN_CASES_TO_HOLD_OUT} or more, or "
           "a splits.json naming at least 2 validation cases)")
    if validation_dataset is None:
        raise UNetSegError(f"Nothing to judge the fine-tuned model on: {why}. Add more corrected cases, "
                           f"or give the dataset that holds the validation cases of '{package.id}' "
                           "(--validation-dataset).")
    other = load_dataset(validation_dataset)
    # a validation case that is also one of the user's cases is trained on now: not held out
    found = [name for name in recorded if name in {c.name for c in other.cases} and name not in names]
    if len(found) < MIN_HELD_OUT:
        raise UNetSegError(f"{why}, and {validation_dataset} holds {len(found)} of the "
                           f"{len(recorded)} validation cases recorded in '{package.id}' (leaving out "
                           "your own cases); give the dataset the model was validated on.")
    return names, found, other.root, "model validation"


def judge(old_cases: list[dict[str, Any]], new_cases: list[dict[str, Any]], label_names: list[str],
          mean_tolerance: float, organ_tolerance: float, held_out: str) -> Gate:
    """Per organ, the mean Dice over the held-out cases that contoured it, old against new."""
    per_label: dict[str, dict[str, Any]] = {}
    for name in label_names:
        old = np.array([c["labels"][name]["dice"] for c in old_cases], dtype=float)
        new = np.array([c["labels"][name]["dice"] for c in new_cases], dtype=float)
        scored = np.isfinite(old) & np.isfinite(new)  # NaN: the case did not contour this organ
        if scored.any():
            o, n = float(old[scored].mean()), float(new[scored].mean())
            per_label[name] = {"old": o, "new": n, "delta": n - o, "n": int(scored.sum())}
        else:
            per_label[name] = {"old": None, "new": None, "delta": None, "n": 0}
    judged = {k: v for k, v in per_label.items() if v["n"]}
    if not judged:
        raise UNetSegError("None of the held-out cases has a reviewed organ, so the two models cannot be "
                           "compared; mark the reviewed organs of some held-out cases.")
    old_mean = float(np.mean([v["old"] for v in judged.values()]))
    new_mean = float(np.mean([v["new"] for v in judged.values()]))
    reasons = []
    if new_mean < old_mean - mean_tolerance:
        reasons.append(f"Mean Dice fell from {old_mean:.3f} to {new_mean:.3f} (more than the "
                       f"{mean_tolerance:g} allowed).")
    for name, v in judged.items():
        if v["delta"] < -organ_tolerance:
            reasons.append(f"{name} fell from {v['old']:.3f} to {v['new']:.3f} (more than the "
                           f"{organ_tolerance:g} allowed for one organ).")
    return Gate(not reasons, reasons, old_mean, new_mean, per_label,
                [c["case"] for c in old_cases], held_out, mean_tolerance, organ_tolerance)


def candidate_metadata(old, trained, train_cases: list[str], dataset,
                       gate_record: dict[str, Any] | None, version: str) -> dict[str, Any]:
    """The old model's metadata (labels, colours, terminology, postprocessing, inference) with the new
    weights, version and a training record that says what it was fine-tuned on."""
    # not the old performance, nor its int8 graph (quantised from the old weights; none is copied)
    meta = {k: v for k, v in old.meta.items() if k not in ("performance", "int8")}
    previous = old.meta.get("training", {})
    new_training = trained.meta["training"]
    meta["version"] = version
    meta["weights"] = trained.meta["weights"]
    meta["training"] = {
        **previous,
        # still unseen by the new weights, so the next fine-tune can be judged on them too
        "validation_cases": [n for n in previous.get("validation_cases", []) if n not in train_cases],
        "train_cases": previous.get("train_cases", []) + train_cases,
        "finetune": {
            "from": {"id": old.id, "version": old.meta["version"], "sha256": old.weights_key},
            "dataset": str(dataset.root), "train_cases": train_cases,
            "iterations": new_training["iterations"], "learning_rate": new_training["learning_rate"],
            "batch_size": new_training["batch_size"], "patch_size": new_training["patch_size"],
            "time_s": new_training["time_s"], "precision": new_training["precision"],
            "gate": gate_record,
        },
    }
    if gate_record is None:
        return meta
    meta["performance"] = {
        "summary": f"mean Dice {gate_record['new_mean_dice']:.3f} on {len(gate_record['cases'])} "
                   f"held-out cases ({gate_record['held_out']}), against "
                   f"{gate_record['old_mean_dice']:.3f} for v{old.meta['version']}",
        "method": "unetseg finetune gate: full pipeline on each scan's own grid, Dice per organ over "
                  "the held-out cases that contoured it",
    }
    return meta


def finetune(model: str | None, dataset: str | Path, output: str | Path,
             settings: FinetuneSettings | None = None, validation_dataset: str | Path | None = None,
             progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
             log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune ``model`` (id or package folder; default the default model) on ``dataset``, judge it
    against the current model and install it only if it is not worse. ``output``: a new run folder.

    Raises UNetSegError before any training for a bad dataset, settings or run folder, and
    CancelledError when ``cancel()`` turns True (nothing is installed)."""
    from . import modelversions
    from .evaluate import evaluate_model
    from .modelpkg import METADATA_FILE, get_model, load_package, validate_metadata
    from .train.checks import check_dataset
    from .train.dataset import load_dataset
    from .train.trainer import TrainConfig, Trainer

    settings = settings or FinetuneSettings()
    settings.check()
    progress = progress or (lambda stage, fraction: None)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UNetSegError(f"The run folder '{output}' is not empty; give a new folder for this "
                           "fine-tune (it keeps the training run, both evaluations and the candidate).")
    old = get_model(model)
    if len(old.weight_files) != 1:
        raise UNetSegError(f"'{old.id}' is an ensemble; fine-tune one of its member models instead.")
    check_dataset(dataset)
    user = load_dataset(dataset)
    if list(user.labels) != old.label_names:
        raise UNetSegError(f"The dataset's labels ({', '.join(user.labels)}) are not the labels of "
                           f"'{old.id}' ({', '.join(old.label_names)}), in the same order; a training set "
                           "for a model must use its labels (the panel's 'Add to training set' does).")
    train_names, held_out, eval_root, source = choose_cases(user, old, validation_dataset)
    if validation_dataset is not None and source == "user":
        log("note: the dataset has enough held-out cases of its own; --validation-dataset is not used.")
    version = modelversions.next_version(old.id, old.meta["version"])
    log(f"Fine-tuning '{old.id}' v{old.meta['version']} on {len(train_names)} case(s) of {user.root}; "
        f"judged on {len(held_out)} held-out case(s) ({source}: {', '.join(held_out)}).")
    times: dict[str, float] = {}

    t = time.perf_counter()
    progress("fine-tuning", 0.0)
    mirror = old.meta["inference"].get("tta_mirror_pairs") or []
    cfg = TrainConfig(dataset=Path(dataset), output=output / "train", model_id=old.id, version=version,
                      init_from=str(old.path), iterations=settings.iterations,
                      learning_rate=settings.learning_rate, batch_size=settings.batch_size,
                      patch_size=settings.patch_size, device=settings.device, seed=settings.seed,
                      num_threads=settings.num_threads, time_limit_min=settings.time_limit_min,
                      precision=settings.precision, mirror_pairs=[list(p) for p in mirror],
                      val_every=settings.iterations + 1,
                      cases={"train": train_names, "validation": []})
    trained = load_package(Trainer(cfg, progress=lambda f: progress("fine-tuning", f),
                                   cancel=cancel).run())
    times["train_s"] = time.perf_counter() - t
    (output / "train" / "checkpoint.pt").unlink(missing_ok=True)  # 4x the weights; never resumed
    # The candidate is the old package (labels, terminology, postprocessing, inference settings) with
    # the new weights, so that the two are compared through exactly the same pipeline.
    candidate_dir = output / "candidate"
    candidate_dir.mkdir()
    for w in trained.weight_files:
        (candidate_dir / w["file"]).write_bytes((trained.path / w["file"]).read_bytes())

    def write_candidate(gate_record: dict[str, Any] | None):
        meta = candidate_metadata(old, trained, train_names, user, gate_record, version)
        validate_metadata(meta, "the fine-tuned model's metadata")
        (candidate_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return load_package(candidate_dir)

    candidate = write_candidate(None)
    reports = {}
    for key, package, stage in (("old", old, f"evaluating v{old.meta['version']}"),
                                ("new", candidate, f"evaluating the fine-tuned v{version}")):
        t = time.perf_counter()
        progress(stage, 0.0)
        log(f"{stage} on {len(held_out)} held-out case(s)")
        reports[key] = evaluate_model(str(package.path), str(eval_root), ",".join(held_out),
                                      output / f"evaluation-{key}", settings.device, worst=0,
                                      runtime=settings.runtime, cancel=cancel,
                                      progress=partial(progress, stage))
        times[f"evaluate_{key}_s"] = time.perf_counter() - t
    gate = judge(reports["old"]["cases"], reports["new"]["cases"], old.label_names,
                 settings.mean_tolerance, settings.organ_tolerance, source)
    candidate = write_candidate(_finite(asdict(gate)))  # the same weights, now with the figures

    installed = None
    if gate.accepted:
        if cancel is not None and cancel():
            raise CancelledError("Fine-tuning was cancelled before the new version was installed.")
        progress("installing", 0.0)
        installed = modelversions.install_version(candidate, {
            "parent": old.meta["version"], "parent_sha256": old.weights_key, "dataset": str(user.root),
            "train_cases": train_names, "held_out": source, "held_out_cases": held_out,
            "old_mean_dice": round(gate.old_mean_dice, 4), "new_mean_dice": round(gate.new_mean_dice, 4),
            "run_folder": str(output)}).path
        progress("installing", 1.0)
    result = FinetuneResult(gate.accepted, gate, old.id, old.meta["version"], version, candidate_dir,
                            installed, train_names, times)
    (output / "finetune.json").write_text(json.dumps(_finite(result.to_json()), indent=2) + "\n")
    log(result.summary())
    return result


def _finite(obj):
    """JSON without NaN (None instead), floats rounded for reading."""
    if isinstance(obj, float):
        return round(obj, 4) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def print_gate(gate: Gate) -> None:
    print(f"{'organ':<16}{'n':>4}{'current':>10}{'fine-tuned':>12}{'change':>9}")
    for name, v in gate.per_label.items():
        if v["n"]:
            print(f"{name:<16}{v['n']:>4}{v['old']:>10.3f}{v['new']:>12.3f}{v['delta']:>+9.3f}")
        else:
            print(f"{name:<16}{0:>4}{'not contoured in the held-out cases':>31}")
    print(f"{'mean':<16}{'':>4}{gate.old_mean_dice:>10.3f}{gate.new_mean_dice:>12.3f}"
          f"{gate.new_mean_dice - gate.old_mean_dice:>+9.3f}")
