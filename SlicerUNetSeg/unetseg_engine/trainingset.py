"""A user's training set of corrected cases, in nnU-Net v2 layout, ready for ``unetseg finetune``.

``add_case`` writes one case: ``imagesTr/<case>_0000.nii.gz`` (one file per input channel),
``labelsTr/<case>.nii.gz`` (uint8, on the image's grid, the model's label values) and the case's
entry in ``partial_labels.json`` (the label values that were reviewed; ``train/dataset.py`` reads it),
and keeps ``dataset.json`` (labels, channels, ``numTraining``, ``partial_labels``) current. Only
reviewed organs may be in the label map: an organ left unreviewed is *not contoured*, and the
trainer's marginal loss then does not read its zeros as background.

Nothing is ever overwritten: a new case gets the next free id (``case_0001``, ...), and an id that is
taken anywhere (an image, a label map or the partial-label list) is refused. Files are written to
temporary names, read back and renamed (``outputs.atomic_write``), in the order image, partial-label
entry, label map: the label map is what makes a case exist (``load_dataset`` finds cases by it), so an
interrupted write never leaves a case that looks fully contoured; at worst an entry without a label
map, which ``check_dataset`` names.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import UNetSegError
from .imageio import grid_differences
from .outputs import atomic_write, verify_image_file

ENDING = ".nii.gz"
PARTIAL_FILE = "partial_labels.json"
CASE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_training_set_dir(model_id: str) -> Path:
    """``<user data>/unetseg/training-sets/<model id>`` (beside the user models folder)."""
    from .modelpkg import user_models_dir

    return user_models_dir().parent / "training-sets" / model_id


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n",
                                                        encoding="utf-8"))


def _taken_ids(root: Path, partial_table: dict[str, Any]) -> set[str]:
    taken = set(partial_table)
    patterns = (("imagesTr", re.compile(r"_\d{4}\.nii\.gz$")), ("labelsTr", re.compile(r"\.nii\.gz$")))
    for sub, strip in patterns:
        folder = root / sub
        if folder.is_dir():
            taken |= {strip.sub("", p.name) for p in folder.iterdir() if p.name.endswith(ENDING)}
    return taken


def next_case_id(root: Path, partial_table: dict[str, Any]) -> str:
    taken = _taken_ids(root, partial_table)
    numbers = [int(m.group(1)) for name in taken if (m := re.fullmatch(r"case_(\d+)", name))]
    return f"case_{max(numbers, default=0) + 1:04d}"


def dataset_meta(labels: list[dict[str, Any]], channel_names: list[str], name: str) -> dict[str, Any]:
    return {"name": name, "channel_names": {str(i): c for i, c in enumerate(channel_names)},
            "labels": {"background": 0, **{label["name"]: int(label["value"]) for label in labels}},
            "numTraining": 0, "file_ending": ENDING, "partial_labels": PARTIAL_FILE}


def add_case(root: str | os.PathLike, images: list[sitk.Image], label: sitk.Image,
             labels: list[dict[str, Any]], reviewed: list[int], channel_names: list[str],
             case_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Add one case; returns ``{"case", "images", "label", "reviewed"}``. ``labels``: the model's
    labels (``name``, ``value``); ``reviewed``: the values whose segments were reviewed."""
    root = Path(root)
    if len(images) != len(channel_names) or not images:
        raise UNetSegError(f"Give one image per input channel ({', '.join(channel_names)}); "
                           f"{len(images)} were given.")
    values = {int(label["value"]) for label in labels}
    reviewed = sorted({int(v) for v in reviewed})
    if not reviewed:
        raise UNetSegError("No segment is marked as reviewed; review (and correct) at least one organ "
                           "before adding the case to the training set.")
    unknown = [v for v in reviewed if v not in values]
    if unknown:
        raise UNetSegError(f"Label values {unknown} are not labels of the model ({sorted(values)}).")
    for index, image in enumerate(images):
        differences = grid_differences(image, images[0])
        if differences or image.GetDimension() != 3:
            raise UNetSegError(f"Input channel {index + 1} is not on the first channel's 3D grid "
                               f"({'; '.join(differences) or 'not 3D'}).")
    differences = grid_differences(label, images[0])
    if differences:
        raise UNetSegError(f"The label map is not on the image's grid ({'; '.join(differences)}).")
    label_array = sitk.GetArrayViewFromImage(label)
    present = {int(v) for v in np.unique(label_array)} - {0}
    stray = sorted(present - set(reviewed))
    if stray:
        raise UNetSegError(f"The label map holds values {stray} that are not marked as reviewed; an "
                           "unreviewed organ must not be in it (it would be taught as drawn).")

    meta_path = root / "dataset.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        wanted = dataset_meta(labels, channel_names, "")
        if meta.get("labels") != wanted["labels"] or meta.get("channel_names") != wanted["channel_names"]:
            raise UNetSegError(f"The training set {root} was made for other labels or channels "
                               f"({meta.get('labels')}, {meta.get('channel_names')}); choose another "
                               "folder for this model's cases.")
        if meta.get("file_ending", ENDING) != ENDING:
            raise UNetSegError(f"The training set {root} uses '{meta.get('file_ending')}' files; this "
                               f"writes {ENDING}. Choose another folder.")
    else:
        if root.exists() and any(root.iterdir()):
            raise UNetSegError(f"'{root}' is not empty and has no dataset.json; choose an empty or new "
                               "folder for the training set.")
        meta = dataset_meta(labels, channel_names, name or "Corrected cases")
    partial_name = meta.setdefault("partial_labels", PARTIAL_FILE)
    partial_path = root / partial_name
    table = json.loads(partial_path.read_text(encoding="utf-8")) if partial_path.is_file() else {}
    if case_id is None:
        case_id = next_case_id(root, table)
    elif not CASE_PATTERN.match(case_id):
        raise UNetSegError(f"Case id '{case_id}': letters, digits, '.', '_' or '-' (up to 64), starting "
                           "with a letter or digit.")
    elif case_id in _taken_ids(root, table):
        raise UNetSegError(f"The training set {root} already has a case '{case_id}'; nothing was "
                           "overwritten. Choose another case id (or leave it empty for a new one).")

    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image_paths = [root / "imagesTr" / f"{case_id}_{c:04d}{ENDING}" for c in range(len(images))]
    for image, path in zip(images, image_paths):
        atomic_write(path, partial(sitk.WriteImage, image, useCompression=True),
                     verify=partial(verify_image_file, image=image))
    table[case_id] = reviewed
    _write_json(partial_path, table)
    label_u8 = sitk.Cast(label, sitk.sitkUInt8) if label.GetPixelID() != sitk.sitkUInt8 else label
    label_path = root / "labelsTr" / f"{case_id}{ENDING}"
    atomic_write(label_path, lambda tmp: sitk.WriteImage(label_u8, tmp, useCompression=True),
                 verify=partial(verify_image_file, image=label_u8))
    meta["numTraining"] = len(list((root / "labelsTr").glob(f"*{ENDING}")))
    _write_json(meta_path, meta)
    return {"case": case_id, "images": [str(p) for p in image_paths], "label": str(label_path),
            "reviewed": reviewed, "dataset": str(root)}
