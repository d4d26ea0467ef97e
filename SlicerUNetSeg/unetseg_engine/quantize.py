"""int8 for the CPU: post-training quantisation of a model package's network with NNCF, behind a gate.

``unetseg quantize MODEL --dataset DIR`` does, in order:

1. **Calibrate.** Windows of the model's own input (each training case cropped, resampled and
   normalised exactly as the predictor does, then cut at random places into inference windows) are
   fed to NNCF's post-training quantisation of the package's ONNX graph (the one the OpenVINO and
   ONNX Runtime runtimes already use, see ``runtimes.onnx_graph``). The result is an OpenVINO IR with
   int8 convolutions: the CPU's VNNI instructions run it about 1.5x faster than float32.
2. **Measure.** Every validation case of every dataset given is segmented twice, by OpenVINO float32
   and by the int8 graph, and each (case, organ) Dice against the reference contours is compared
   (partially contoured cases count only their contoured organs).
3. **Gate.** The int8 graph is added to the package only if the mean Dice drops by at most
   ``MAX_MEAN_DROP`` (0.005) and no organ's mean Dice by more than ``MAX_LABEL_DROP`` (0.01). Otherwise
   nothing in the package changes, and the command says which organ failed and by how much.

An accepted graph is stored in the package (``int8/model.xml`` and ``.bin``, with their SHA-256 and
the measured figures under ``"int8"`` in the metadata), because calibration needs training data the
user does not have, and it is checked like the weights before every use. It runs only when asked for
(``--runtime openvino-int8``): ``auto`` keeps float32, whose labels are the reference.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UNetSegError
from .modelpkg import METADATA_FILE, ModelPackage, get_model, load_package, sha256_of, validate_metadata
from .outputs import atomic_write

MAX_MEAN_DROP = 0.005
MAX_LABEL_DROP = 0.01
INT8_DIR = "int8"


def calibration_windows(package: ModelPackage, cases: list, windows_per_case: int = 4,
                        seed: int = 0) -> list[np.ndarray]:
    """(1, C, z, y, x) float32 windows of the model's input, cut from ``cases`` after the predictor's
    own preprocessing, at random places (a window larger than the case is padded with its minimum)."""
    from .imageio import read_image
    from .preprocess import prepare

    rng = random.Random(seed)
    window_zyx = list(package.meta["inference"]["patch_size"])[::-1]
    windows = []
    for case in cases:
        prepared = prepare([read_image(p) for p in case.images], package.meta["preprocessing"])
        array = prepared.array  # (C, z, y, x), normalised
        for _ in range(windows_per_case):
            start = [rng.randint(0, max(0, n - w)) for n, w in zip(array.shape[1:], window_zyx)]
            piece = array[:, start[0]:start[0] + window_zyx[0], start[1]:start[1] + window_zyx[1],
                          start[2]:start[2] + window_zyx[2]]
            window = np.full((1, array.shape[0], *window_zyx), array.min(), np.float32)
            window[0, :, :piece.shape[1], :piece.shape[2], :piece.shape[3]] = piece
            windows.append(window)
    return windows


def quantize_graph(package: ModelPackage, windows: list[np.ndarray]):
    """The package's network as an int8 OpenVINO model (NNCF post-training quantisation)."""
    try:
        import nncf
        import openvino as ov
    except ImportError as error:
        raise UNetSegError(f"Quantisation needs OpenVINO and NNCF ({error}); install the engine's "
                           "'int8' extra (pip install 'slicerunetseg[int8]').") from None
    from .networks import volume_network
    from .packagecheck import build_loaded_networks
    from .runtimes import onnx_graph

    net = package.meta["network"]
    window_zyx = tuple(package.meta["inference"]["patch_size"][::-1])
    graph = onnx_graph(lambda: volume_network(build_loaded_networks(package)[0], net["spatial_dims"]).eval(),
                       package.weight_files[0]["sha256"], window_zyx, len(package.meta["inputs"]))
    model = ov.Core().read_model(str(graph))
    model.reshape({model.input(0): [1, len(package.meta["inputs"]), *window_zyx]})
    # MIXED: symmetric weights, asymmetric activations (the network's inputs and ReLU outputs are
    # not centred on zero)
    return nncf.quantize(model, nncf.Dataset(windows), subset_size=len(windows),
                         preset=nncf.QuantizationPreset.MIXED)


def gate(pairs: list[tuple[str, float, float]]) -> dict[str, Any]:
    """The accept/reject rule on (label, float32 Dice, int8 Dice) of every judged (case, label) pair."""
    if not pairs:
        raise UNetSegError("No validation case with contours was found to measure int8 against.")
    change = float(np.mean([q - f for _, f, q in pairs]))
    labels = sorted({name for name, _, _ in pairs}, key=[p[0] for p in pairs].index)
    per_label = {name: float(np.mean([q - f for n, f, q in pairs if n == name])) for name in labels}
    worst = min(per_label, key=lambda name: per_label[name])
    reasons = []
    if change < -MAX_MEAN_DROP:
        reasons.append(f"the mean Dice drops by {-change:.4f} (at most {MAX_MEAN_DROP} allowed)")
    if per_label[worst] < -MAX_LABEL_DROP:
        reasons.append(f"{worst}'s Dice drops by {-per_label[worst]:.4f} (at most {MAX_LABEL_DROP} "
                       "allowed per organ)")
    return {"accepted": not reasons, "reasons": reasons, "mean_dice_change": change,
            "label_dice_change": per_label, "worst_label": worst, "pairs": len(pairs)}


def _validation_pairs(float_package: ModelPackage, int8_package: ModelPackage, datasets: list[str],
                      max_cases: int | None, log: Callable[[str], None]) -> tuple[list, dict]:
    """Segment every validation case with both and return the (label, float Dice, int8 Dice) pairs."""
    import SimpleITK as sitk

    from .evaluate import _select_cases, compare_label_maps, match_labels
    from .imageio import read_image
    from .inference import Predictor
    from .train.dataset import load_dataset

    labels = {label["value"]: label["name"] for label in float_package.labels}
    on_float = Predictor(device="cpu", runtime="openvino")
    on_float.load(float_package)
    on_int8 = Predictor(device="cpu", runtime="openvino-int8")
    on_int8.load(int8_package)
    if on_int8.runtime != "openvino-int8" or on_float.runtime != "openvino":
        raise UNetSegError("OpenVINO could not run the model here: " + " ".join(
            on_float.runtime_notes + on_int8.runtime_notes))
    pairs, times = [], {"float32_s": 0.0, "int8_s": 0.0}
    for root in datasets:
        dataset = load_dataset(root)
        ref_values = match_labels(labels, dataset.labels, f"model '{float_package.id}'", root)
        chosen = _select_cases(dataset, float_package.meta.get("training", {}), "validation")
        for case in chosen[:max_cases]:
            images = [read_image(p) for p in case.images]
            ref = sitk.ReadImage(str(case.label))
            a, b = on_float.predict(images), on_int8.predict(images)
            times["float32_s"] += a.timings.get("inference_s", 0.0)
            times["int8_s"] += b.timings.get("inference_s", 0.0)
            fa = compare_label_maps(a.label_map, ref, labels, ref_values, f"Case '{case.name}': ")
            fb = compare_label_maps(b.label_map, ref, labels, ref_values, f"Case '{case.name}': ")
            judged = [n for n in labels.values()
                      if case.labelled is None or ref_values[n] in case.labelled]
            pairs += [(n, fa[n]["dice"], fb[n]["dice"]) for n in judged
                      if not (math.isnan(fa[n]["dice"]) or math.isnan(fb[n]["dice"]))]
            log(f"  {case.name}: mean Dice float32 {np.mean([fa[n]['dice'] for n in judged]):.4f}, "
                f"int8 {np.mean([fb[n]['dice'] for n in judged]):.4f}")
    return pairs, times


def quantize_model(model: str, datasets: list[str], *, calibration_cases: int = 8,
                   windows_per_case: int = 4, max_validation_cases: int | None = None,
                   overwrite: bool = False, seed: int = 0, log: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    """Calibrate, measure and gate (see the module's docstring); adds the graph only when accepted.

    ``datasets``: nnU-Net-layout folders with the model's labels; calibration uses the first's
    training cases (the model's own split), validation every folder's validation cases.
    """
    import nncf
    import openvino as ov

    from .evaluate import _select_cases
    from .train.dataset import load_dataset

    package = get_model(model)
    if len(package.weight_files) != 1:
        raise UNetSegError(f"Model '{package.id}' is an ensemble; quantise its members' packages.")
    if package.meta.get("int8") and not overwrite:
        raise UNetSegError(f"Model '{package.id}' already has an int8 graph; use --overwrite to "
                           "calibrate and measure a new one.")
    if not datasets:
        raise UNetSegError("Give at least one --dataset: calibration needs training cases and the gate "
                           "needs contoured validation cases.")
    train = _select_cases(load_dataset(datasets[0]), package.meta.get("training", {}), "train")
    cases = random.Random(seed).sample(train, min(calibration_cases, len(train)))
    log(f"Calibrating on {len(cases)} training cases x {windows_per_case} windows ...")
    quantized = quantize_graph(package, calibration_windows(package, cases, windows_per_case, seed))

    with tempfile.TemporaryDirectory(prefix=f".{package.id}-int8.", dir=package.path.parent) as tmp:
        staged = Path(tmp) / package.id
        staged.mkdir()
        for w in package.weight_files:
            shutil.copy2(package.path / w["file"], staged / w["file"])
        (staged / INT8_DIR).mkdir()
        ov.save_model(quantized, str(staged / INT8_DIR / "model.xml"), compress_to_fp16=False)
        meta = json.loads(json.dumps(package.meta))
        meta["int8"] = {
            "runtime": "openvino",
            "files": [{"file": name, "sha256": sha256_of(staged / INT8_DIR / name)}
                      for name in ("model.xml", "model.bin")],
            "openvino": ov.__version__.split("-")[0], "nncf": nncf.__version__,
            "calibration": {"dataset": Path(datasets[0]).name, "cases": len(cases),
                            "windows": len(cases) * windows_per_case, "seed": seed},
        }
        (staged / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log("Measuring float32 and int8 on the validation cases ...")
        pairs, times = _validation_pairs(package, load_package(staged), datasets, max_validation_cases,
                                         log)
        verdict = gate(pairs)
        verdict["network_s"] = times
        meta["int8"]["validation"] = {
            "datasets": [Path(d).name for d in datasets], "pairs": verdict["pairs"],
            "mean_dice_change": round(verdict["mean_dice_change"], 5),
            "label_dice_change": {k: round(v, 5) for k, v in verdict["label_dice_change"].items()},
            "network_time_ratio": round(times["int8_s"] / times["float32_s"], 3)
            if times["float32_s"] else None,
        }
        if verdict["accepted"]:
            validate_metadata(meta)
            target = package.path / INT8_DIR
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(staged / INT8_DIR), str(target))
            atomic_write(package.path / METADATA_FILE,
                         lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    verdict["metadata"] = meta["int8"]
    return verdict


def quantize_cli(args) -> int:
    verdict = quantize_model(args.model, args.dataset, calibration_cases=args.calibration_cases,
                             windows_per_case=args.windows_per_case,
                             max_validation_cases=args.max_validation_cases, overwrite=args.overwrite)
    v = verdict["metadata"]["validation"]
    print(f"int8 against float32 over {v['pairs']} (case, organ) pairs: mean Dice change "
          f"{v['mean_dice_change']:+.4f}; per organ " +
          ", ".join(f"{k} {c:+.4f}" for k, c in v["label_dice_change"].items()) +
          (f"; network time int8/float32 {v['network_time_ratio']:.2f}" if v["network_time_ratio"] else ""))
    if not verdict["accepted"]:
        print("Not added: " + "; ".join(verdict["reasons"]) + ". The model package is unchanged.")
        return 1
    print(f"Added to model '{args.model}': run it with --runtime openvino-int8.")
    return 0
