"""Train/validation splits (splits files, cross-validation folds) and which cases `evaluate` judges."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_package, tiny_meta
from unetseg_engine.errors import UNetSegError
from unetseg_engine.evaluate import evaluate_model
from unetseg_engine.train.dataset import load_dataset
from unetseg_engine.train.trainer import TrainConfig, Trainer

CASES = [f"case_{i:02d}" for i in range(11)]


@pytest.fixture()
def dataset(tmp_path):
    """A small nnU-Net v2 dataset folder (no splits file): CT-like blobs with one labelled organ."""
    root = tmp_path / "Dataset001_Blobs"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for name in CASES:
        ct = np.full((12, 24, 24), -1000, np.int16)
        ct[2:10, 4:20, 4:20] = 40
        label = np.zeros(ct.shape, np.uint8)
        z, y, x = rng.integers(3, 6), rng.integers(6, 12), rng.integers(6, 12)
        label[z:z + 4, y:y + 6, x:x + 6] = 1
        ct[label == 1] = 200
        for array, folder, suffix in ((ct, "imagesTr", "_0000"), (label, "labelsTr", "")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((4.0, 4.0, 4.0))
            sitk.WriteImage(image, str(root / folder / f"{name}{suffix}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "name": "Blobs", "channel_names": {"0": "CT"}, "labels": {"background": 0, "Blob": 1},
        "numTraining": len(CASES), "file_ending": ".nii.gz"}))
    return root


def names(cases) -> list[str]:
    return [c.name for c in cases]


def test_cross_validation_folds_partition_the_cases(dataset):
    data = load_dataset(dataset)
    held_out = []
    for fold in range(5):
        train, val = data.split(fold=fold, n_folds=5)
        assert not set(names(train)) & set(names(val))
        assert sorted(names(train) + names(val)) == CASES
        held_out += names(val)
    assert sorted(held_out) == CASES  # every case is validated in exactly one fold
    with pytest.raises(UNetSegError, match="no fold|not possible"):
        data.split(fold=5, n_folds=5)


def test_the_split_does_not_follow_the_training_seed(dataset, tmp_path):
    """Models trained with different seeds (to ensemble) must hold out the same cases."""
    def val_cases(**kw):
        cfg = TrainConfig(dataset=dataset, output=tmp_path / "run", model_id="m", **kw)
        return names(Trainer(cfg).val_cases)

    assert val_cases(seed=0) == val_cases(seed=7)
    assert val_cases(seed=0, fold=2) == val_cases(seed=3, fold=2) != val_cases(seed=0, fold=1)


def test_nnunet_splits_final_list_of_folds(dataset):
    folds = [{"train": CASES[3:], "val": CASES[:3]}, {"train": CASES[:8], "val": CASES[8:]}]
    (dataset / "splits_final.json").write_text(json.dumps(folds))
    data = load_dataset(dataset)
    assert names(data.split()[1]) == CASES[:3]  # fold 0 by default
    assert names(data.split(fold=1)[1]) == CASES[8:]
    with pytest.raises(UNetSegError, match="2 folds"):
        data.split(fold=2)
    (dataset / "splits.json").write_text(json.dumps({"train": CASES[2:], "validation": CASES[:2]}))
    data = load_dataset(dataset)  # splits.json wins over splits_final.json
    assert names(data.split()[1]) == CASES[:2]
    with pytest.raises(UNetSegError, match="single train/validation split"):
        data.split(fold=1)


def test_evaluate_judges_the_cases_the_model_was_validated_on(dataset, tmp_path, capsys):
    meta = tiny_meta("blob-model", label_names=["Blob"], n_labels=1)
    meta["training"] = {"train_cases": CASES[2:], "validation_cases": CASES[:2]}
    package = make_package(tmp_path / "blob-model", meta)
    report = evaluate_model(str(package.path), str(dataset), "validation", tmp_path / "eval",
                            device="cpu", worst=0)
    assert [c["case"] for c in report["cases"]] == CASES[:2]
    assert "Warning" not in capsys.readouterr().out
    report = evaluate_model(str(package.path), str(dataset), "train", tmp_path / "eval-train",
                            device="cpu", worst=0)
    assert [c["case"] for c in report["cases"]] == CASES[2:]

    # cases the model was trained on: evaluated, but flagged as optimistic
    report = evaluate_model(str(package.path), str(dataset), ",".join(CASES[1:4]), tmp_path / "e2",
                            device="cpu", worst=0)
    assert "2 of these 3 cases were used to train the model" in capsys.readouterr().out
    written = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert written["cases_seen_in_training"] == CASES[2:4]
    with pytest.raises(UNetSegError, match="Unknown case"):
        evaluate_model(str(package.path), str(dataset), "case_99", tmp_path / "e3", device="cpu")
