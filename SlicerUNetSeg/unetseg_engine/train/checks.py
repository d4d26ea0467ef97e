"""Everything ``unetseg train`` can check before the first iteration: the arguments and the dataset.

Training trusts its data: a label value missing from ``dataset.json``, a label map on a shifted or
differently spaced grid, or float labels used to go into a valid-looking model package, and a bad model
id was only found when the package was written, after the training. These checks read the headers
(``ImageFileReader.ReadImageInformation``) and the label maps once, collect every problem, and raise one
UNetSegError listing them all, so a user fixes the dataset in one go.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import UNetSegError
from ..imageio import grid_differences

MAX_LISTED = 25  # problems spelled out in the message; the rest are counted

_FLOAT_PIXELS = (sitk.sitkFloat32, sitk.sitkFloat64)


def _schema_part(*path: str) -> dict[str, Any]:
    """A piece of the model-package schema, so that training refuses what export would refuse."""
    from ..modelpkg import _schema

    node = _schema()
    for key in path:
        node = node["properties"][key]
    return node


def check_arguments(settings: dict[str, Any]) -> None:
    """Refuse, before any work, settings that the exported model package could not hold."""
    import jsonschema

    problems = []
    model_id = settings.get("model_id")
    pattern = _schema_part("id")["pattern"]
    if not model_id:
        problems.append("give --model-id (or a --recipe that names one) for the trained model")
    elif not re.match(pattern, str(model_id)):
        problems.append(f"--model-id '{model_id}' is not a valid model id: 2 to 64 characters, lower-case "
                        "letters, digits, '.', '_' or '-', starting with a letter or digit")
    checks = [("spacing", ("preprocessing", "spacing_mm"), "x,y,z in mm"),
              ("patch_size", ("inference", "patch_size"), "x,y,z in voxels")]
    for key, where, form in checks:
        value = settings.get(key)
        if value is None:
            continue
        try:
            jsonschema.validate(list(value), _schema_part(*where))
        except jsonschema.ValidationError as error:
            problems.append(f"--{key.replace('_', '-')} {value} ({form}): {error.message}")
    patch = settings.get("patch_size")
    if patch is not None and not problems and not settings.get("init_from"):
        problems += _patch_problems(settings, list(patch))
    window = settings.get("window")
    if window is not None:
        norm = _schema_part("preprocessing", "normalization")["properties"]
        for name, value in zip(("level", "width"), window):
            try:
                jsonschema.validate(value, norm[name])
            except jsonschema.ValidationError as error:
                problems.append(f"--window {name} {value:g} HU: {error.message}")
    if problems:
        raise UNetSegError(_summary("The training options have", problems))


def _patch_problems(settings: dict[str, Any], patch: list[int]) -> list[str]:
    """Whether the network the planner builds for ``patch`` can take windows of that size (a patch
    of 33 voxels plans three stride-2 levels and would fail at the first iteration)."""
    from ..networks import check_patch_fits
    from .planner import plan_experiment

    # The network depends only on the patch and these options; the fingerprint values are unused.
    unused = {"spacing_median": [1.0] * 3, "spacing_p10": [1.0] * 3, "extent_mm_median": [1.0] * 3,
              "foreground_intensity": {"p00_5": 0.0, "p99_5": 1.0}}
    kwargs = {k: settings[k] for k in ("architecture", "spatial_dims", "base_features") if k in settings}
    network = plan_experiment(unused, "MR", spacing=[1.0] * 3, patch_size=patch, **kwargs)["network"]
    try:
        check_patch_fits(network["architecture"], network["spatial_dims"], network["params"], patch)
    except UNetSegError as error:
        return [f"--patch-size: {error}"]
    return []


def check_dataset(root: str | Path) -> None:
    """Raise UNetSegError listing every problem of the nnU-Net dataset at ``root``.

    Checks ``dataset.json`` (labels, channels), that every case's images and label map read, are 3D
    and share one grid (size, spacing, origin, direction), that label maps hold whole numbers that
    ``dataset.json`` names, and the ``partial_labels`` file when there is one: a JSON object
    ``{case: [label values contoured]}`` whose cases exist, whose values are labels of the dataset,
    and whose label maps hold nothing but 0 and the listed values.
    """
    from .dataset import load_dataset

    root = Path(root)
    meta = _read_dataset_json(root)
    try:
        dataset = load_dataset(root)
    except UNetSegError as error:
        raise UNetSegError(_summary(f"The dataset '{root}' has", [str(error)])) from None
    problems: list[str] = []
    known = {int(v) for v in dataset.labels.values()}
    allowed = {case.name: {0} | known for case in dataset.cases}
    partial = meta.get("partial_labels")
    if partial is not None:
        for name, values in _read_partial_labels(root, partial, allowed, known, problems).items():
            allowed[name] = {0} | values
    for case in dataset.cases:
        problems += [f"case '{case.name}': {p}" for p in _check_case(case, allowed[case.name], known)]
    if problems:
        raise UNetSegError(_summary(f"The dataset '{root}' has", problems))


def dataset_labels(root: str | Path) -> dict[str, int]:
    """Foreground label names and values of the dataset at ``root``, from a checked dataset.json."""
    labels = _read_dataset_json(Path(root))["labels"]
    return {name: value for name, value in labels.items() if value != 0}


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise UNetSegError(f"'{root}' has no dataset.json; a training dataset follows nnU-Net v2's "
                           "layout (dataset.json, imagesTr/, labelsTr/).")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UNetSegError(f"{path} is not valid JSON ({type(error).__name__}: {error}).") from None
    problems = []
    if not isinstance(meta, dict):
        raise UNetSegError(f"{path} must hold a JSON object, as nnU-Net's dataset.json does.")
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append("'labels' must map label names to values, e.g. {\"background\": 0, \"Liver\": 1}")
    else:
        values = list(labels.values())
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535 for v in values):
            problems.append(f"label values must be whole numbers from 0 to 65535, not {values}")
        elif len(set(values)) != len(values):
            problems.append(f"label values repeat: {labels}")
        elif 0 not in values or len(values) < 2:
            problems.append("'labels' needs \"background\": 0 and at least one structure")
    channels = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    if not isinstance(channels, dict) or set(channels) != {str(i) for i in range(max(len(channels), 1))}:
        problems.append("'channel_names' must number the input channels from \"0\", e.g. {\"0\": \"CT\"}")
    if not isinstance(meta.get("file_ending", ".nii.gz"), str):
        problems.append("'file_ending' must be a string such as \".nii.gz\"")
    if problems:
        raise UNetSegError(_summary(f"{path} has", problems))
    return meta


def _read_partial_labels(root: Path, partial: Any, allowed: dict[str, set[int]], known: set[int],
                         problems: list[str]) -> dict[str, set[int]]:
    """The contoured label values of each case named in the partial-labels file."""
    path = root / str(partial)
    if not isinstance(partial, str) or not path.is_file():
        problems.append(f"'partial_labels' names '{partial}', which is not a file in the dataset folder")
        return {}
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        problems.append(f"{path.name} is not valid JSON ({type(error).__name__})")
        return {}
    if not isinstance(listed, dict):
        problems.append(f"{path.name} must map case names to lists of label values")
        return {}
    contoured = {}
    for name, values in listed.items():
        if name not in allowed:
            problems.append(f"{path.name} names case '{name}', which is not in labelsTr/")
            continue
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                   for v in values):
            problems.append(f"{path.name}: case '{name}' must list label values (whole numbers), "
                            f"not {values!r}")
            continue
        unknown = sorted(set(values) - known)
        if unknown:
            problems.append(f"{path.name}: case '{name}' lists label value(s) {unknown} that "
                            f"dataset.json does not name (it has {sorted(known)})")
        contoured[name] = set(values) & known
    return contoured


def _header(path: Path) -> sitk.ImageFileReader | str:
    """The file's header, or why it cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return f"'{path.name}' cannot be read as an image"
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return (f"'{path.name}' is not a 3D single-component volume ({reader.GetDimension()}D, "
                f"{reader.GetNumberOfComponents()} components)")
    return reader


def _check_case(case, allowed: set[int], known: set[int]) -> list[str]:
    problems = []
    label = _header(case.label)
    images = [_header(p) for p in case.images]
    problems += [h for h in [label, *images] if isinstance(h, str)]
    if isinstance(label, str):
        return problems
    for path, image in zip(case.images, images):
        if not isinstance(image, str):
            differences = grid_differences(image, label)
            if differences:
                problems.append(f"label map and '{path.name}' are on different grids "
                                f"({'; '.join(differences)})")
    label_image = sitk.ReadImage(str(case.label))  # held: the view below borrows its buffer
    values = np.unique(sitk.GetArrayViewFromImage(label_image))
    if label.GetPixelID() in _FLOAT_PIXELS and not np.all(np.equal(np.mod(values, 1), 0)):
        odd = values[np.mod(values, 1) != 0]
        problems.append(f"label map holds non-integer values ({', '.join(f'{v:g}' for v in odd[:5])}"
                        f"{', ...' if odd.size > 5 else ''}); store whole label values")
        values = values[np.mod(values, 1) == 0]
    stray = sorted(int(v) for v in values if int(v) not in allowed)
    if stray:
        what = "dataset.json does not name" if not set(stray) <= known else \
            "its partial_labels entry does not list"
        problems.append(f"label map holds value(s) {stray} that {what} (allowed: {sorted(allowed)})")
    return problems


def _summary(subject: str, problems: list[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    count = "a problem" if len(problems) == 1 else f"{len(problems)} problems"
    return f"{subject} {count}; fix {'it' if len(problems) == 1 else 'them'} and try again: " + \
        "; ".join(shown) + more + "."
