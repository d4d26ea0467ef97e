"""nnU-Net v2 dataset folders: ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and optional ``splits.json``
(or nnU-Net's ``splits_final.json``).

Partially contoured datasets: ``dataset.json`` may carry ``"partial_labels": "FILE.json"``, a file in
the dataset folder mapping each case to the label values that were contoured in it, e.g.
``{"pt_1": [2, 3, 4, 7], ...}``. In such a case a voxel of value 0 is background only where every
listed organ is known; an organ that is not listed was *not contoured*, which is not the same as
absent, so training must not read its zeros as background (see ``losses.py``). Cases the file does
not name are taken as fully contoured.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import UNetSegError
from ..imageio import read_image
from ..preprocess import foreground_box, prepare, resample_to

SPLIT_SEED = 0  # shuffles the cases for a split made without a splits file


@dataclass
class Case:
    name: str
    images: list[Path]
    label: Path
    labelled: list[int] | None = None  # label values contoured in this case; None: all of them

    def is_partial(self, label_values: list[int]) -> bool:
        return self.labelled is not None and not set(label_values) <= set(self.labelled)


@dataclass
class Dataset:
    root: Path
    meta: dict[str, Any]
    cases: list[Case]

    @property
    def channel_names(self) -> list[str]:
        names = self.meta.get("channel_names") or self.meta.get("modality") or {"0": "image"}
        return [names[k] for k in sorted(names, key=int)]

    @property
    def labels(self) -> dict[str, int]:
        """Foreground labels, name -> value (background excluded)."""
        return {k: int(v) for k, v in self.meta["labels"].items() if int(v) != 0}

    def split(self, val_fraction: float = 0.2, seed: int = SPLIT_SEED,
              fold: int | None = None, n_folds: int = 5) -> tuple[list[Case], list[Case]]:
        """Training and validation cases.

        From ``splits.json`` (or nnU-Net's ``splits_final.json``) when the dataset has one: either
        ``{"train": [...], "validation": [...]}`` or nnU-Net's list of folds ``[{"train", "val"}, ...]``,
        of which ``fold`` picks one (default 0). Without a file: a seeded random split holding out
        ``val_fraction`` of the cases or, with ``fold``, fold ``fold`` of a seeded ``n_folds``-fold
        cross-validation (every case is validated in exactly one fold).
        """
        by_name = {c.name: c for c in self.cases}
        split_file = next((self.root / name for name in ("splits.json", "splits_final.json")
                           if (self.root / name).is_file()), None)
        if split_file is not None:
            splits = json.loads(split_file.read_text())
            if isinstance(splits, list):  # nnU-Net's splits_final.json: a list of folds
                index = fold or 0
                if not 0 <= index < len(splits):
                    raise UNetSegError(f"{split_file.name} has {len(splits)} folds (0 to "
                                       f"{len(splits) - 1}); there is no fold {index}.")
                splits = splits[index]
            elif fold is not None:
                raise UNetSegError(f"{split_file.name} holds a single train/validation split, not a list "
                                   "of folds: leave out --fold, or write the folds as nnU-Net does.")
            val_key = "val" if "val" in splits else "validation"
            try:
                return [by_name[n] for n in splits["train"]], [by_name[n] for n in splits[val_key]]
            except KeyError as error:
                raise UNetSegError(f"{split_file} names case {error} that is not in imagesTr/.") from None
        names = sorted(by_name)
        random.Random(seed).shuffle(names)
        if fold is not None:
            if not 2 <= n_folds <= len(names) or not 0 <= fold < n_folds:
                raise UNetSegError(f"Fold {fold} of {n_folds} is not possible with {len(names)} cases "
                                   "(folds are numbered from 0; at least 2 folds).")
            held_out = set(np.array_split(np.array(names), n_folds)[fold].tolist())
            return ([by_name[n] for n in names if n not in held_out],
                    [by_name[n] for n in names if n in held_out])
        n_val = max(1, int(round(len(names) * val_fraction)))
        return [by_name[n] for n in names[n_val:]], [by_name[n] for n in names[:n_val]]


def load_dataset(root: str | Path) -> Dataset:
    """Find the cases of an nnU-Net v2 dataset folder, with a clear error when the layout is wrong."""
    root = Path(root)
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        raise UNetSegError(f"'{root}' has no dataset.json; a training dataset follows nnU-Net v2's "
                           "layout (dataset.json, imagesTr/, labelsTr/).")
    meta = json.loads(meta_file.read_text())
    ending = meta.get("file_ending", ".nii.gz")
    n_channels = len(meta.get("channel_names") or meta.get("modality") or {"0": ""})
    cases = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        name = label.name[: -len(ending)]
        images = [root / "imagesTr" / f"{name}_{c:04d}{ending}" for c in range(n_channels)]
        missing = [p.name for p in images if not p.is_file()]
        if missing:
            raise UNetSegError(f"Case '{name}' has a label but no image {missing[0]} in imagesTr/.")
        cases.append(Case(name, images, label))
    if not cases:
        raise UNetSegError(f"No labelled cases found in '{root / 'labelsTr'}' (file ending {ending}).")
    if meta.get("partial_labels"):
        labelled = read_partial_labels(root / meta["partial_labels"])
        for case in cases:
            case.labelled = labelled.get(case.name)
    return Dataset(root, meta, cases)


def read_partial_labels(path: Path) -> dict[str, list[int]]:
    """The ``partial_labels`` file: case name -> contoured label values. Its contents are checked in
    full (cases exist, values are labels, label maps hold nothing else) by ``checks.check_dataset``,
    which ``unetseg train`` runs first; here only what is needed to read it."""
    try:
        table = json.loads(path.read_text())
        return {str(name): sorted({int(v) for v in values}) for name, values in table.items()}
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UNetSegError(f"The partial_labels file {path} must be a JSON object mapping each case "
                           f'to its contoured label values, e.g. {{"case_1": [1, 3]}} ({error}).') from None


def fingerprint(dataset: Dataset, cases: list[Case], crop_threshold: float | None) -> dict[str, Any]:
    """Spacings, foreground-box sizes (mm) and intensity statistics inside the labels, as nnU-Net."""
    spacings, extents, samples = [], [], []
    rng = np.random.default_rng(0)
    for case in cases:
        image = sitk.ReadImage(str(case.images[0]))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        box = foreground_box(image, crop_threshold, margin_mm=0.0)
        spacings.append(image.GetSpacing())
        extents.append(np.array(box.size) * np.array(image.GetSpacing()))
        values = sitk.GetArrayViewFromImage(image)[label > 0]
        samples.append(rng.choice(values, size=min(10000, values.size), replace=False))
    values = np.concatenate(samples).astype(np.float64)
    return {
        "n_cases": len(cases),
        "spacing_median": np.median(spacings, axis=0).tolist(),
        "spacing_p10": np.percentile(spacings, 10, axis=0).tolist(),
        "extent_mm_median": np.median(extents, axis=0).tolist(),
        "foreground_intensity": {
            "mean": float(values.mean()), "std": float(values.std()),
            "p00_5": float(np.percentile(values, 0.5)), "p99_5": float(np.percentile(values, 99.5)),
        },
    }


def prepare_case(case: Case, preprocessing: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Image channels and label map of one case on its model grid, exactly as inference prepares them."""
    images = [read_image(p, "training image") for p in case.images]
    prepared = prepare(images, preprocessing)
    label = resample_to(sitk.ReadImage(str(case.label)), prepared.grid, nearest=True,
                        pixel_type=sitk.sitkUInt8)
    return prepared.array, sitk.GetArrayFromImage(label)
