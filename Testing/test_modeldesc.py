"""The typed model description (``modeldesc.py``): built once from validated metadata, with the
schema's defaults written in one place, and frozen."""

import dataclasses

import pytest

from helpers import tiny_meta
from unetseg_engine.modeldesc import ModelDescription, Postprocessing
from unetseg_engine.modelpkg import get_model, load_package

WEIGHTS = {"file": "model.pt", "sha256": "0" * 64}


def test_the_shipped_model_reads_as_its_metadata_says():
    package = get_model("openkbp-hn-oar")
    desc, meta = package.desc, package.meta
    assert desc is package.desc  # built once
    assert desc.id == meta["id"] and desc.version == meta["version"] and desc.modality == "CT"
    assert desc.label_names == [label["name"] for label in meta["labels"]]
    assert desc.label_values == [label["value"] for label in meta["labels"]]
    assert desc.preprocessing.spacing_mm == tuple(meta["preprocessing"]["spacing_mm"])
    assert desc.inference.patch_size == tuple(meta["inference"]["patch_size"])
    assert desc.window_zyx == tuple(reversed(meta["inference"]["patch_size"]))
    assert desc.out_channels == len(meta["labels"]) + 1 and not desc.multilabel
    assert desc.weights_key == package.weights_key
    norm = meta["preprocessing"]["normalization"]
    assert desc.preprocessing.normalization.window == (norm["level"], norm["width"])
    for label, raw in zip(desc.labels, meta["labels"]):
        assert bool(label.postprocessing) == bool(raw.get("postprocessing"))


def test_missing_optional_fields_take_the_schemas_defaults():
    meta = dict(tiny_meta(), weights=WEIGHTS)
    meta["inference"] = {"patch_size": [32, 32, 16]}
    meta["preprocessing"] = {"spacing_mm": [2, 2, 3], "normalization": {"method": "percentile"}}
    desc = ModelDescription.from_meta(meta)
    assert (desc.inference.overlap, desc.inference.sw_batch_size, desc.inference.blend_mode) == \
        (0.5, 2, "gaussian")
    assert desc.inference.tta_flip_axes == () and desc.inference.tta_mirror_pairs == ()
    assert desc.threshold == 0.5 and desc.int8_files == () and desc.nnunet is None and not desc.merged
    crop = desc.preprocessing.foreground_crop
    assert crop.enabled and crop.threshold is None and crop.margin_mm == 10.0 and crop.box_threshold is None
    norm = desc.preprocessing.normalization
    assert (norm.lower, norm.upper, norm.window) == (0.5, 99.5, None)
    assert all(not label.postprocessing for label in desc.labels)


def test_an_ensemble_lists_every_member_and_the_description_is_frozen(tmp_path):
    meta = dict(tiny_meta(), weights=[WEIGHTS, dict(WEIGHTS, file="m2.pt", sha256="1" * 64)])
    desc = ModelDescription.from_meta(meta)
    assert [w.file for w in desc.weights] == ["model.pt", "m2.pt"]
    assert desc.weights_key == "0" * 64 + "+" + "1" * 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.id = "other"  # type: ignore[misc]
    assert not Postprocessing() and Postprocessing(min_island_mm3=5.0)


def test_loading_a_package_builds_its_description(tiny_package):
    package = load_package(tiny_package.path)
    assert "desc" in vars(package)  # built by load_package, from the metadata it just validated
