"""Bad training datasets and evaluation inputs: refused up front with one line listing every problem.

The datasets are small synthetic volumes written in the test (nnU-Net v2 layout), so these run
without the shared data; nothing trains.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import refused
from unetseg_engine.evaluate import compare_label_maps
from unetseg_engine.train.checks import check_dataset

SHAPE = (16, 20, 24)  # (z, y, x)


def volume(array, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def label_array(values=(1, 2), dtype=np.uint8):
    label = np.zeros(SHAPE, dtype)
    for i, value in enumerate(values):
        label[4:8, 4 + 6 * i:8 + 6 * i, 4:12] = value
    return label


def make_dataset(root, cases=None, labels=None, extra=None):
    """A dataset whose cases are ``{name: (label image, image keyword changes)}``; by default two good
    cases. Returns the root."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = cases or {"case_a": (volume(label_array()), {}), "case_b": (volume(label_array()), {})}
    rng = np.random.default_rng(0)
    for name, (label, image_geometry) in cases.items():
        ct = rng.normal(0, 100, SHAPE).astype(np.int16)
        geometry = {"spacing": label.GetSpacing(), "origin": label.GetOrigin(),
                    "direction": label.GetDirection(), **image_geometry}
        sitk.WriteImage(volume(ct, **geometry), str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
    meta = {"name": "synthetic", "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
            "labels": labels or {"background": 0, "Structure1": 1, "Structure2": 2}, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def train_argv(dataset, out, model_id="synthetic-test"):
    return ["train", str(dataset), "-o", str(out), "--model-id", model_id, "--iterations", "1",
            "--val-every", "1", "--spacing", "4,4,6", "--patch-size", "16,16,16", "--base-features", "4",
            "--window", "0,400", "--num-threads", "1", "--device", "cpu"]


# ---- D17: train validates the whole dataset and the options first ------------------------------------

def test_train_lists_every_dataset_problem_before_training(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds", cases={
        "good": (volume(label_array()), {}),
        "unknown_value": (volume(label_array(values=(1, 5))), {}),
        "shifted": (volume(label_array()), {"origin": (7.0, 0.0, 0.0)}),
        "respaced": (volume(label_array()), {"spacing": (1.0, 2.0, 3.0)}),
        "float_labels": (volume(label_array(dtype=np.float32) * 0.5), {}),
    })
    line = refused(capsys, train_argv(dataset, tmp_path / "run"), "4 problems")
    assert "case 'unknown_value'" in line and "[5]" in line
    assert "case 'shifted'" in line and "origin" in line
    assert "case 'respaced'" in line and "spacing" in line
    assert "case 'float_labels'" in line and "non-integer" in line
    assert "case 'good'" not in line
    assert not (tmp_path / "run").exists()  # nothing was started


def test_train_refuses_an_invalid_model_id_before_training(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds")
    refused(capsys, train_argv(dataset, tmp_path / "run", model_id="My Model!"), "--model-id 'My Model!'")
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_patch_its_network_cannot_take_before_training(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds")
    argv = train_argv(dataset, tmp_path / "run")
    argv[argv.index("--patch-size") + 1] = "33,32,32"
    refused(capsys, argv, "--patch-size", "multiple")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,words", [("{not json", "not valid JSON"),
                                        ('{"channel_names": {"0": "CT"}}', "'labels'"),
                                        ('{"labels": {"background": 0, "A": "one"}}', "whole numbers")])
def test_train_refuses_a_broken_dataset_json_in_one_line(text, words, tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds")
    (dataset / "dataset.json").write_text(text)
    refused(capsys, train_argv(dataset, tmp_path / "run"), words)
    assert not (tmp_path / "run").exists()


def test_partial_labels_file_is_checked(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds", extra={"partial_labels": "partial.json"})
    (dataset / "partial.json").write_text(json.dumps({"case_a": [1], "case_b": [1, 2, 9], "ghost": [2]}))
    line = refused(capsys, train_argv(dataset, tmp_path / "run"), "3 problems")
    assert "'ghost'" in line  # a case that does not exist
    assert "[9]" in line  # a label value dataset.json does not name
    assert "case 'case_a'" in line and "[2]" in line  # contoured a label its entry does not list
    assert not (tmp_path / "run").exists()


def test_a_sound_dataset_passes_the_checks(tmp_path):
    dataset = make_dataset(tmp_path / "ds", extra={"partial_labels": "partial.json"})
    (dataset / "partial.json").write_text(json.dumps({"case_a": [1, 2]}))
    check_dataset(dataset)  # raises nothing


# ---- D18: evaluate compares only maps on the same grid, and labels by name ---------------------------

OBLIQUE = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("change,words", [({"origin": (0.0, 0.0, 30.0)}, "origin"),
                                          ({"direction": OBLIQUE}, "direction")])
def test_evaluate_refuses_maps_on_different_grids(change, words, tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    sitk.WriteImage(volume(label_array(), **change), str(tmp_path / "pred" / "c.nii.gz"))
    sitk.WriteImage(volume(label_array()), str(tmp_path / "ref" / "c.nii.gz"))
    refused(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                     "-o", str(tmp_path / "eval")], words)
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_a_model_whose_labels_the_dataset_does_not_have(tiny_package, tmp_path,
                                                                         capsys):
    dataset = make_dataset(tmp_path / "ds", labels={"background": 0, "RightParotid": 1,
                                                    "SpinalCord": 2})
    line = refused(capsys, ["evaluate", "--model", str(tiny_package.path), "--dataset", str(dataset),
                            "--cases", "all", "-o", str(tmp_path / "eval")], "Structure1", "RightParotid")
    assert "SpinalCord" in line
    assert not (tmp_path / "eval").exists()


def test_labels_are_compared_by_name_not_by_value():
    pred = volume(label_array(values=(1, 2)))  # the model: A = 1, B = 2
    ref = volume(label_array(values=(2, 1)))  # the dataset: A = 2, B = 1
    metrics = compare_label_maps(pred, ref, {1: "A", 2: "B"}, ref_values={"A": 2, "B": 1})
    assert metrics["A"]["dice"] == 1.0 and metrics["B"]["dice"] == 1.0
