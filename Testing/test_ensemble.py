"""Ensembles: packages of several networks whose class probabilities are averaged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_package, tiny_meta
from unetseg_engine.cli import main
from unetseg_engine.errors import UNetSegError
from unetseg_engine.inference import Predictor
from unetseg_engine.modelpkg import import_model, load_package, write_ensemble
from unetseg_engine.preprocess import prepare


@pytest.fixture(scope="module")
def ct():
    """A synthetic CT with a bright blob (the tiny random networks need only something to see)."""
    array = np.full((24, 48, 48), -1000, np.int16)
    array[4:20, 8:40, 8:40] = 40
    array[8:16, 16:32, 16:32] = 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((3.0, 3.0, 4.0))
    return image


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny models with the same plan and different (seeded) weights."""
    folder = tmp_path_factory.mktemp("members")
    return [make_package(folder / f"m{seed}", tiny_meta(f"member-{seed}"), seed=seed)
            for seed in (1, 2)]


def _probabilities(package, ct) -> np.ndarray:
    # one runtime for all, so that the comparisons below see the averaging, not runtime rounding
    predictor = Predictor(device="cpu", runtime="torch")
    predictor.load(package)
    prepared = prepare([ct], package.desc.preprocessing, None)
    return predictor.network.probabilities(prepared.array)[0]


def test_ensemble_probabilities_are_the_mean_of_its_members(members, ct, tmp_path):
    ensemble = write_ensemble(tmp_path / "ens", members, "tiny-ensemble")
    assert [w["file"] for w in ensemble.weight_files] == ["member1.pt", "member2.pt"]
    first, second = (_probabilities(m, ct) for m in members)
    assert np.abs(first - second).max() > 0.01  # the members really differ
    np.testing.assert_allclose(_probabilities(ensemble, ct), (first + second) / 2, atol=1e-5)
    # the whole path: labels on the input grid, from averaged probabilities
    predictor = Predictor(device="cpu")
    predictor.load(ensemble)
    assert len(predictor.networks if predictor.runtime == "torch" else predictor.window_runners) == 2
    assert predictor.predict([ct]).label_map.GetSize() == ct.GetSize()


def test_half_precision_storage_halves_the_size_and_keeps_the_labels(members, ct, tmp_path):
    full = write_ensemble(tmp_path / "full", members, "tiny-full")
    half = write_ensemble(tmp_path / "half", members, "tiny-half", half=True)
    assert half.meta["training"]["weights_dtype"] == "float16"
    assert half.weights_bytes < 0.6 * full.weights_bytes
    np.testing.assert_allclose(_probabilities(half, ct), _probabilities(full, ct), atol=2e-3)


def test_ensemble_metadata_names_its_members_and_drops_their_performance(members, tmp_path):
    ensemble = write_ensemble(tmp_path / "ens", members, "tiny-ensemble", version="2.0.0")
    meta = ensemble.meta
    assert meta["id"] == "tiny-ensemble" and meta["version"] == "2.0.0"
    assert [m["id"] for m in meta["training"]["ensemble_of"]] == ["member-1", "member-2"]
    assert "performance" not in meta  # measured afresh by `unetseg evaluate --write-performance`
    assert meta["labels"] == members[0].meta["labels"]


def test_members_with_different_labels_or_plans_are_refused(members, tmp_path):
    other = make_package(tmp_path / "other", tiny_meta("other", label_names=["A", "B", "C"]))
    with pytest.raises(UNetSegError, match="differ in 'labels'"):
        write_ensemble(tmp_path / "ens", [members[0], other], "bad")
    meta = tiny_meta("coarser")
    meta["preprocessing"]["spacing_mm"] = [8.0, 8.0, 8.0]
    coarser = make_package(tmp_path / "coarser", meta)
    with pytest.raises(UNetSegError, match="differ in 'preprocessing'"):
        write_ensemble(tmp_path / "ens", [members[0], coarser], "bad")
    with pytest.raises(UNetSegError, match="at least two"):
        write_ensemble(tmp_path / "ens", members[:1], "bad")
    assert not (tmp_path / "ens").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_cli_refuses_an_existing_folder_and_import_copies_every_member(members, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "ens"
    assert main(["ensemble", str(members[0].path), str(members[1].path), "-o", str(out),
                 "--model-id", "tiny-ensemble", "--half"]) == 0
    assert "2 networks" in capsys.readouterr().out
    monkeypatch.setenv("UNETSEG_MODELS_PATH", str(tmp_path))
    assert main(["models"]) == 0
    assert "ensemble of 2 networks" in capsys.readouterr().out
    before = (out / "metadata.json").read_text()
    assert main(["ensemble", str(members[0].path), str(members[1].path), "-o", str(out),
                 "--model-id", "again"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metadata.json").read_text() == before  # untouched

    monkeypatch.setenv("UNETSEG_USER_MODELS", str(tmp_path / "user"))
    installed = import_model(out)
    assert sorted(p.name for p in installed.path.iterdir()) == ["member1.pt", "member2.pt",
                                                                 "metadata.json"]
    assert len(installed.load_state_dicts()) == 2  # both checksums verified
    with pytest.raises(UNetSegError, match="ensemble of 2"):
        installed.load_state_dict()  # e.g. `train --init-from` needs a single network


def test_a_damaged_member_is_refused_by_checksum(members, tmp_path):
    ensemble = write_ensemble(tmp_path / "ens", members, "tiny-ensemble")
    with open(ensemble.path / "member2.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UNetSegError, match="member2.pt.*checksum"):
        Predictor(device="cpu").load(load_package(ensemble.path))
    meta = json.loads((ensemble.path / "metadata.json").read_text())
    assert len(meta["weights"]) == 2


def test_ensemble_of_folds_keeps_only_cases_no_member_has_seen_for_validation(tmp_path):
    folds = [(["a", "b", "c"], ["d", "e"]), (["a", "b", "d"], ["c", "e"])]
    members = []
    for index, (train, val) in enumerate(folds):
        meta = tiny_meta(f"fold-{index}")
        meta["training"] = {"train_cases": train, "validation_cases": val, "fold": index}
        members.append(make_package(tmp_path / f"fold{index}", meta, seed=index))
    training = write_ensemble(tmp_path / "ens", members, "folds").meta["training"]
    assert training["train_cases"] == ["a", "b", "c", "d"]
    assert training["validation_cases"] == ["e"]  # what `evaluate --cases validation` will judge


def test_monai_reference_pipeline_averages_the_members_probabilities(members, tmp_path):
    """The benchmark's reference does what a MONAI user would do with an ensemble."""
    import torch

    from unetseg_engine.reference import ReferencePipeline

    ensemble = write_ensemble(tmp_path / "ens", members, "tiny-ensemble")
    x = torch.rand(1, 1, 32, 32, 16)  # MONAI's (B, C, x, y, z) window
    outputs = []
    for package in (*members, ensemble):
        reference = ReferencePipeline(package, "cpu")
        reference.load()
        with torch.no_grad():
            outputs.append(reference.network(x))
    first, second, both = outputs
    expected = (torch.softmax(first, 1) + torch.softmax(second, 1)) / 2
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
