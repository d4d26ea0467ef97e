"""Learning from corrections: the training-set export, the gated fine-tune, versions and restore.

The fine-tunes run the shipped model on crops of real OpenKBP cases (two training patients as the
user's corrected cases, two validation patients the model never saw as the held-out cases), a few
iterations each: at a tiny learning rate on the real labels the result must be accepted, and with the
organs' labels shuffled at a high learning rate it must be rejected, with the figures that say why.
Quality-free paths (cancel, install, case choice) use a tiny random network with the same labels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import OPENKBP_LABELS, data_path, make_package, openkbp, tiny_meta
from unetseg_engine import modelversions
from unetseg_engine.errors import CancelledError, UNetSegError
from unetseg_engine.finetune import FinetuneSettings, choose_cases, finetune
from unetseg_engine.modelpkg import DEFAULT_MODEL_ID, get_model, list_models, shipped_models_dir

TRAIN, HELD_OUT = ["pt_4", "pt_13"], ["pt_201", "pt_222"]  # the shipped model's train / validation cases
CROP = (slice(34, 94), slice(32, 87), slice(30, 125))  # x, y, z voxels: the neck, one model window
SHUFFLE = np.array([0, 7, 6, 5, 4, 3, 2, 1], np.uint8)  # six of the seven organs relabelled


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    folder = tmp_path / "user-models"
    monkeypatch.setenv("UNETSEG_USER_MODELS", str(folder))
    monkeypatch.delenv("UNETSEG_MODELS_PATH", raising=False)
    return folder


def cropped_dataset(folder, train=TRAIN, held_out=HELD_OUT, shuffle=False, splits=True):
    """An nnU-Net dataset of crops of real OpenKBP cases (``shuffle``: the training cases' organs
    relabelled, a deliberately broken training set)."""
    root = data_path("openkbp_hn_oar")
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text((root / "dataset.json").read_text())
    for case in train + held_out:
        ct, label = openkbp(case)
        image = sitk.ReadImage(str(ct))[CROP]
        labels = sitk.ReadImage(str(label))[CROP]
        if shuffle and case in train:
            broken = sitk.GetImageFromArray(SHUFFLE[sitk.GetArrayFromImage(labels)])
            broken.CopyInformation(labels)
            labels = broken
        sitk.WriteImage(image, str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(labels, str(folder / "labelsTr" / f"{case}.nii.gz"))
    if splits:
        (folder / "splits.json").write_text(json.dumps({"train": train, "validation": held_out}))
    return folder


def shipped():
    if not (shipped_models_dir() / DEFAULT_MODEL_ID / "metadata.json").is_file():
        pytest.skip("the shipped default model is not installed")
    return get_model(DEFAULT_MODEL_ID)


def settings(**kwargs):
    base = dict(iterations=2, batch_size=1, patch_size=[48, 48, 32], device="cpu", num_threads=2,
                precision="fp32")
    return FinetuneSettings(**{**base, **kwargs})


def reported_dice(run, key):
    """Per organ, the mean Dice over cases in evaluation-<key>/metrics.json (what evaluate wrote)."""
    cases = json.loads((run / f"evaluation-{key}" / "metrics.json").read_text())["cases"]
    return {name: float(np.mean([c["labels"][name]["dice"] for c in cases])) for name in OPENKBP_LABELS}


def check_gate_figures(result, run):
    """The gate's numbers are the evaluations' numbers, and its verdict follows from them."""
    gate = result.gate
    old, new = reported_dice(run, "old"), reported_dice(run, "new")
    for name in OPENKBP_LABELS:
        assert gate.per_label[name]["old"] == pytest.approx(old[name], abs=1e-9)
        assert gate.per_label[name]["new"] == pytest.approx(new[name], abs=1e-9)
    assert gate.old_mean_dice == pytest.approx(np.mean(list(old.values())), abs=1e-9)
    assert gate.new_mean_dice == pytest.approx(np.mean(list(new.values())), abs=1e-9)
    worse = gate.new_mean_dice < gate.old_mean_dice - gate.mean_tolerance or any(
        v["delta"] < -gate.organ_tolerance for v in gate.per_label.values())
    assert result.accepted == (not worse)
    assert gate.cases == HELD_OUT and gate.held_out == "user"
    recorded = json.loads((run / "finetune.json").read_text())
    assert recorded["accepted"] == result.accepted
    assert recorded["gate"]["new_mean_dice"] == pytest.approx(gate.new_mean_dice, abs=1e-4)


def test_finetune_at_a_tiny_learning_rate_is_accepted_installed_listed_and_restorable(
        tmp_path, user_models, capsys):
    from unetseg_engine.cli import main

    base = shipped()
    dataset = cropped_dataset(tmp_path / "corrections")
    run = tmp_path / "run"
    result = finetune(None, dataset, run, settings(learning_rate=1e-6))
    check_gate_figures(result, run)
    assert result.accepted, result.summary()
    # on the clinical contours of two patients it never saw, the shipped model's Dice is real
    assert result.gate.old_mean_dice > 0.6
    assert abs(result.gate.new_mean_dice - result.gate.old_mean_dice) < 0.01
    assert (result.old_version, result.new_version) == (base.meta["version"], "1.2.1")

    active = get_model(DEFAULT_MODEL_ID)  # what segment, batch and the panel now use
    assert active.meta["version"] == "1.2.1"
    assert active.path == user_models / "_versions" / DEFAULT_MODEL_ID / "1.2.1"
    assert active.weights_key != base.weights_key
    assert active.labels == base.labels  # names, colours, terminology kept
    assert active.meta["inference"] == base.meta["inference"]  # the same pipeline
    finetuned = active.meta["training"]["finetune"]
    assert finetuned["from"]["version"] == base.meta["version"] and finetuned["train_cases"] == TRAIN
    assert [m.meta["version"] for m in list_models() if m.id == DEFAULT_MODEL_ID] == ["1.2.1"]

    capsys.readouterr()
    assert main(["models"]) == 0
    assert "versions: 1.2.0 (base), 1.2.1 (fine-tuned, active)" in capsys.readouterr().out
    assert main(["versions", DEFAULT_MODEL_ID, "--restore"]) == 0
    assert "now at version 1.2.0" in capsys.readouterr().out
    assert get_model(DEFAULT_MODEL_ID).path == base.path
    assert main(["versions", DEFAULT_MODEL_ID, "--restore"]) == 2  # nothing before the base
    assert "no earlier version" in capsys.readouterr().err
    assert main(["versions", DEFAULT_MODEL_ID, "--restore", "1.2.1"]) == 0
    assert get_model(DEFAULT_MODEL_ID).meta["version"] == "1.2.1"


def test_finetune_on_shuffled_labels_at_a_high_learning_rate_is_rejected_and_installs_nothing(
        tmp_path, user_models):
    base = shipped()
    dataset = cropped_dataset(tmp_path / "broken", shuffle=True)
    run = tmp_path / "run"
    result = finetune(None, dataset, run, settings(learning_rate=1e-2))
    check_gate_figures(result, run)
    assert not result.accepted, result.summary()
    gate = result.gate
    assert gate.new_mean_dice < gate.old_mean_dice - gate.mean_tolerance
    assert any("fell from" in reason for reason in gate.reasons)
    assert result.installed is None
    assert get_model(DEFAULT_MODEL_ID).path == base.path  # the old model stays
    assert not (user_models / "_versions" / DEFAULT_MODEL_ID).exists()
    assert get_model(str(result.candidate)).meta["version"] == "1.2.1"  # kept for inspection only


@pytest.fixture
def tiny_hn(tmp_path, monkeypatch, user_models):
    """A tiny random network with the OpenKBP labels, as the only model on the path."""
    meta = tiny_meta("tiny-hn", label_names=OPENKBP_LABELS)
    meta["training"] = {"validation_cases": ["pt_201", "pt_222", "pt_225"], "train_cases": TRAIN}
    package = make_package(tmp_path / "models" / "tiny-hn", meta)
    monkeypatch.setenv("UNETSEG_MODELS_PATH", str(tmp_path / "models"))
    return package


def test_cancel_during_training_installs_nothing(tmp_path, tiny_hn, user_models):
    dataset = cropped_dataset(tmp_path / "corrections")
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3  # after the first iteration

    with pytest.raises(CancelledError):
        finetune("tiny-hn", dataset, tmp_path / "run", settings(iterations=50), cancel=cancel)
    assert not (user_models / "_versions").exists()
    assert get_model("tiny-hn").path == tiny_hn.path
    assert not (tmp_path / "run" / "candidate").exists()


def test_an_interrupted_install_leaves_no_version(tmp_path, tiny_hn, user_models, monkeypatch):
    candidate = make_package(tmp_path / "candidate", dict(tiny_hn.meta, version="0.0.2"), seed=1)
    copied = []
    real_copy = modelversions.shutil.copy2

    def copy_then_fail(source, target):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(real_copy(source, target))

    monkeypatch.setattr(modelversions.shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError):
        modelversions.install_version(candidate, {"parent": "0.0.1"})
    folder = user_models / "_versions" / "tiny-hn"
    assert list(folder.iterdir()) == [], "the staging folder was left behind"
    assert get_model("tiny-hn").path == tiny_hn.path
    # a process killed mid-copy leaves a hidden staging folder with a metadata.json: never listed
    staging = folder / ".0.0.2.killed"
    staging.mkdir()
    (staging / "metadata.json").write_text((candidate.path / "metadata.json").read_text())
    # and so does an import-model of a new model killed mid-copy (its weights file missing or short)
    (user_models / ".tiny-new.killed").mkdir(parents=True)
    (user_models / ".tiny-new.killed" / "metadata.json").write_text(
        json.dumps(dict(candidate.meta, id="tiny-new")))
    assert [m.path for m in list_models() if m.id.startswith("tiny")] == [tiny_hn.path]
    monkeypatch.undo()
    monkeypatch.setenv("UNETSEG_USER_MODELS", str(user_models))
    monkeypatch.setenv("UNETSEG_MODELS_PATH", str(tmp_path / "models"))
    installed = modelversions.install_version(candidate, {"parent": "0.0.1"})
    assert get_model("tiny-hn").path == installed.path == folder / "0.0.2"
    assert modelversions.next_version("tiny-hn", "0.0.2") == "0.0.3"


def test_too_few_user_cases_are_judged_on_the_models_own_validation_cases(tmp_path, tiny_hn):
    from unetseg_engine.train.dataset import load_dataset

    dataset = load_dataset(cropped_dataset(tmp_path / "few", TRAIN, ["pt_225"], splits=False))
    with pytest.raises(UNetSegError, match="too few to hold out 2.*--validation-dataset"):
        choose_cases(dataset, tiny_hn, None)
    openkbp_root = data_path("openkbp_hn_oar")
    train, held_out, root, source = choose_cases(dataset, tiny_hn, openkbp_root)
    assert sorted(train) == sorted(TRAIN + ["pt_225"]) and source == "model validation"
    assert held_out == ["pt_201", "pt_222"] and root == openkbp_root  # pt_225 is a user case now
    # six cases without a splits file: a third of them held out, the rest trained on
    six = load_dataset(cropped_dataset(tmp_path / "six", ["pt_4", "pt_13", "pt_17", "pt_22"],
                                       ["pt_31", "pt_34"], splits=False))
    train, held_out, root, source = choose_cases(six, tiny_hn, None)
    assert (len(train), len(held_out), source) == (4, 2, "user")
    assert not set(train) & set(held_out)


def test_finetune_refuses_a_dataset_with_other_labels_before_training(tmp_path, tiny_hn, capsys):
    dataset = cropped_dataset(tmp_path / "other", splits=True)
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{f"Organ{i}": i for i in range(1, 8)}}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UNetSegError, match="are not the labels of 'tiny-hn'"):
        finetune("tiny-hn", dataset, tmp_path / "run", settings())
    assert not (tmp_path / "run").exists()
    from unetseg_engine.cli import main

    assert main(["finetune", str(dataset), "--model", "tiny-hn", "-o", str(tmp_path / "run")]) == 2
    assert main(["finetune", str(dataset), "--model", "tiny-hn", "-o", str(tmp_path / "run"),
                 "--learning-rate", "0"]) == 2
    assert "learning rate 0.0: above 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- the training set ------------------------------------------------------------------------------
def test_add_case_writes_nnunet_files_with_the_reviewed_organs_and_never_overwrites(tmp_path):
    from unetseg_engine.train.checks import check_dataset
    from unetseg_engine.train.dataset import load_dataset
    from unetseg_engine.trainingset import add_case

    ct_path, label_path = openkbp("pt_201")
    ct = sitk.ReadImage(str(ct_path))
    clinical = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    labels = [{"name": n, "value": i + 1} for i, n in enumerate(OPENKBP_LABELS)]
    reviewed = [1, 3, 7]  # brainstem, right parotid, mandible
    only_reviewed = np.where(np.isin(clinical, reviewed), clinical, 0).astype(np.uint8)
    label = sitk.GetImageFromArray(only_reviewed)
    label.CopyInformation(ct)
    root = tmp_path / "training-set"
    first = add_case(root, [ct], label, labels, reviewed, ["CT"])
    second = add_case(root, [ct], label, labels, reviewed, ["CT"])
    assert (first["case"], second["case"]) == ("case_0001", "case_0002")

    image_back = sitk.ReadImage(first["images"][0])
    label_back = sitk.ReadImage(first["label"])
    for back in (image_back, label_back):
        assert back.GetSize() == ct.GetSize()
        assert np.allclose(back.GetSpacing(), ct.GetSpacing())
        assert np.allclose(back.GetOrigin(), ct.GetOrigin())
        assert np.allclose(back.GetDirection(), ct.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(image_back), sitk.GetArrayFromImage(ct))
    assert label_back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(label_back), only_reviewed)
    assert set(np.unique(only_reviewed)) == {0, 1, 3, 7}
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(OPENKBP_LABELS)}}
    assert meta["numTraining"] == 2 and meta["partial_labels"] == "partial_labels.json"
    assert json.loads((root / "partial_labels.json").read_text()) == {"case_0001": reviewed,
                                                                     "case_0002": reviewed}
    check_dataset(root)  # what train and finetune check first
    cases = {c.name: c for c in load_dataset(root).cases}
    assert cases["case_0001"].labelled == reviewed and cases["case_0001"].is_partial(list(range(1, 8)))

    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(UNetSegError, match="already has a case 'case_0001'"):
        add_case(root, [ct], label, labels, reviewed, ["CT"], case_id="case_0001")
    with pytest.raises(UNetSegError, match=r"values \[2\] that are not marked as reviewed"):
        add_case(root, [ct], sitk.ReadImage(str(label_path)) * 0 + 2, labels, reviewed, ["CT"])
    with pytest.raises(UNetSegError, match="No segment is marked as reviewed"):
        add_case(root, [ct], label, labels, [], ["CT"])
    two = sitk.GetImageFromArray(np.where(np.isin(clinical, [1, 3]), clinical, 0).astype(np.uint8))
    two.CopyInformation(ct)
    with pytest.raises(UNetSegError, match="other labels"):
        add_case(root, [ct], two, labels[:3], [1, 3], ["CT"])
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before, "a refused case changed the training set"
