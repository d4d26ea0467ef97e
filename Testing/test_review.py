"""Reviewing what the network drew (``unetseg_engine/review.py``), on real OpenKBP scans with the shipped
model: confidence per organ, plausibility flags on deliberately broken scans, the uncertainty map's grid.

The scans are cropped in head-foot to the organs (plus a margin), so each prediction takes a second or
two; each broken scan is predicted once (module fixtures) and its flags checked by several tests.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import OPENKBP_LABELS, data_path, openkbp
from unetseg_engine.review import FLAGS, label_statistics


def _crop_to_organs(case: str, above_mm: float = 15.0, below_mm: float = 15.0):
    """The CT and labels of ``case`` cropped in head-foot to its organs plus margins."""
    ct_path, label_path = openkbp(case)
    ct, label = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(label_path))
    k = np.flatnonzero(sitk.GetArrayViewFromImage(label).any(axis=(1, 2)))
    dz = ct.GetSpacing()[2]
    lo, hi = max(0, k[0] - int(above_mm / dz)), min(ct.GetSize()[2], k[-1] + 1 + int(below_mm / dz))
    return ct[:, :, int(lo):int(hi)], label[:, :, int(lo):int(hi)]


def _codes(result) -> dict[str, list[str]]:
    return {e["name"]: [f["code"] for f in e["flags"]] for e in result.review}


@pytest.fixture(scope="module")
def predictor():
    data_path("openkbp_hn_oar")
    from unetseg_engine.inference import Predictor
    from unetseg_engine.modelpkg import get_model

    model = get_model(None)
    if not model.meta.get("review"):
        pytest.fail("the shipped model has no training statistics: run `unetseg model-stats` on it")
    predictor = Predictor(device="cpu", runtime="torch", uncertainty=True)
    predictor.load(model)
    return predictor


@pytest.fixture(scope="module")
def clean(predictor):
    ct, label = _crop_to_organs("pt_201")  # a validation patient of the shipped model
    return ct, label, predictor.predict([ct])


@pytest.fixture(scope="module")
def mirrored(predictor, clean):
    ct = clean[0]
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(ct)[:, :, ::-1].copy())
    flipped.CopyInformation(ct)  # the header still says what it said: right and left are now wrong
    return predictor.predict([flipped])


@pytest.fixture(scope="module")
def cut_above_larynx(predictor):
    ct, label = _crop_to_organs("pt_201")
    larynx = np.flatnonzero((sitk.GetArrayViewFromImage(label) == 6).any(axis=(1, 2)))
    # OpenKBP stores slices head first (direction z = -1): the larynx's highest slice is its smallest k
    head_first = ct.GetDirection()[8] < 0
    top = larynx[0] if head_first else larynx[-1]
    cut = ct[:, :, :int(top) - 1] if head_first else ct[:, :, int(top) + 2:]
    return predictor.predict([cut])


def test_a_normal_validation_scan_raises_no_flag_and_reports_real_volumes(clean):
    ct, label, result = clean
    assert [e["name"] for e in result.review] == OPENKBP_LABELS
    assert _codes(result) == {name: [] for name in OPENKBP_LABELS}
    ref = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=8)
    voxel_ml = np.prod(ct.GetSpacing()) / 1000
    for e in result.review:
        assert 0.0 < e["confidence"] <= 1.0
        # the reported volume is that of the label map the user gets, and near the clinical contour
        assert e["volume_ml"] == pytest.approx(
            (sitk.GetArrayViewFromImage(result.label_map) == e["value"]).sum() * voxel_ml, abs=1e-3)
        assert e["volume_ml"] == pytest.approx(ref[e["value"]] * voxel_ml, rel=0.5)


def test_the_focus_point_lies_on_the_segments_border(clean):
    _, _, result = clean
    labels = sitk.GetArrayViewFromImage(result.label_map)
    for e in result.review:
        x, y, z = e["focus_ras"]
        kji = result.label_map.TransformPhysicalPointToIndex((-x, -y, z))[::-1]
        near = labels[tuple(slice(max(0, c - 2), c + 3) for c in kji)]
        assert (near == e["value"]).any() and (near != e["value"]).any(), e["name"]  # a border


def test_a_scan_mirrored_without_updating_its_header_flags_the_parotids(mirrored):
    codes = _codes(mirrored)
    assert "left_right_swapped" in codes["RightParotid"]
    assert "left_right_swapped" in codes["LeftParotid"]
    message = next(f["message"] for e in mirrored.review for f in e["flags"]
                   if f["code"] == "left_right_swapped")
    assert "orientation" in message


def test_a_scan_cut_above_the_larynx_flags_it_missing(cut_above_larynx):
    codes = _codes(cut_above_larynx)
    assert "missing" in codes["Larynx"]
    assert not codes["Brainstem"] and not codes["Mandible"]  # what is in the scan is not flagged


def test_flag_codes_come_from_the_documented_set(clean, mirrored, cut_above_larynx):
    for result in (clean[2], mirrored, cut_above_larynx):
        for e in result.review:
            assert {f["code"] for f in e["flags"]} <= set(FLAGS)


def test_uncertainty_is_uint8_on_the_input_grid_and_high_on_borders(clean):
    ct, _, result = clean
    u = result.uncertainty
    assert u.GetPixelID() == sitk.sitkUInt8
    assert u.GetSize() == ct.GetSize() and u.GetSpacing() == ct.GetSpacing()
    assert u.GetOrigin() == ct.GetOrigin() and u.GetDirection() == ct.GetDirection()
    _assert_uncertain_on_borders(u, result.label_map)


def _assert_uncertain_on_borders(u: sitk.Image, label_map: sitk.Image) -> None:
    from scipy import ndimage

    a, labels = sitk.GetArrayViewFromImage(u), sitk.GetArrayViewFromImage(label_map)
    organ = labels > 0
    border = ndimage.binary_dilation(organ) & ~ndimage.binary_erosion(organ)
    far = ~ndimage.binary_dilation(organ, iterations=8)
    assert a[border].mean() > 3 * max(a[organ & ~border].mean(), 1.0)
    assert (a[far] == 0).mean() > 0.95  # zero where no organ is plausible


def test_uncertainty_map_follows_an_oblique_anisotropic_input(predictor, clean, tmp_path):
    """Through the CLI: the map written by --uncertainty has the input's grid, not the model's."""
    from unetseg_engine.cli import main

    ct = clean[0]
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.15, 0.1, 0.35)
    direction = np.array(rotation.GetMatrix()).reshape(3, 3)
    spacing = (3.1, 2.3, 4.2)
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))
    size = [int(e / s) for e, s in zip((260, 230, 200), spacing)]
    origin = centre - direction @ (np.array(size) * spacing / 2)
    grid = sitk.Image(size, sitk.sitkInt16)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(origin.tolist())
    oblique = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    scan = tmp_path / "oblique.nrrd"
    sitk.WriteImage(oblique, str(scan))
    out, unc, review = tmp_path / "labels.nii.gz", tmp_path / "uncertainty.nrrd", tmp_path / "review.json"
    assert main(["segment", str(scan), "-o", str(out), "--uncertainty", str(unc), "--review-json",
                 str(review), "--device", "cpu", "--runtime", "torch", "-q"]) == 0
    u, labels = sitk.ReadImage(str(unc)), sitk.ReadImage(str(out))
    assert u.GetPixelID() == sitk.sitkUInt8
    assert u.GetSize() == oblique.GetSize()
    assert np.allclose(u.GetSpacing(), spacing) and np.allclose(u.GetOrigin(), oblique.GetOrigin(), atol=1e-4)
    assert np.allclose(u.GetDirection(), oblique.GetDirection(), atol=1e-6)
    _assert_uncertain_on_borders(u, labels)
    entries = json.loads(review.read_text())["labels"]
    assert [e["name"] for e in entries] == OPENKBP_LABELS
    assert all(set(e) >= {"value", "name", "volume_ml", "confidence", "flags", "focus_ras"} for e in entries)


def test_segment_refuses_an_uncertainty_path_that_is_the_output(tmp_path, capsys):
    from unetseg_engine.cli import main

    ct_path, _ = openkbp("pt_201")
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(ct_path), "-o", str(out), "--uncertainty", str(out), "-q"]) == 2
    assert "same file as another output" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _two_case_dataset(folder, partial_labels=None):
    """An nnU-Net dataset of two real OpenKBP cases (links to the shared data)."""
    root = data_path("openkbp_hn_oar")
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in ("pt_201", "pt_222"):
        (folder / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(root / "imagesTr" / f"{case}_0000.nii.gz")
        (folder / "labelsTr" / f"{case}.nii.gz").symlink_to(root / "labelsTr" / f"{case}.nii.gz")
    meta = dict(json.loads((root / "dataset.json").read_text()), numTraining=2)
    if partial_labels:
        meta["partial_labels"] = "labelled.json"
        (folder / "labelled.json").write_text(json.dumps(partial_labels))
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def test_statistics_count_only_contoured_organs(tmp_path):
    """partial_labels: a case that did not contour the larynx adds nothing to its statistics."""
    root = data_path("openkbp_hn_oar")
    dataset = _two_case_dataset(tmp_path / "ds", partial_labels={"pt_201": [1, 2, 3, 4, 5, 7],
                                                                 "pt_222": list(range(1, 8))})
    from unetseg_engine.modelpkg import get_model

    model = get_model(None)
    stats = label_statistics([str(dataset)], model.labels, model.meta["preprocessing"])
    assert stats["labels"]["Larynx"]["cases"] == 1
    assert stats["labels"]["Brainstem"]["cases"] == 2
    # a copy, not a view: a view of a temporary image reads freed memory once the image is collected
    label_222 = sitk.ReadImage(str(root / "labelsTr/pt_222.nii.gz"))
    larynx_222 = (sitk.GetArrayFromImage(label_222) == 6).sum()
    spacing = label_222.GetSpacing()
    assert stats["labels"]["Larynx"]["volume_ml"]["min"] == pytest.approx(
        larynx_222 * np.prod(spacing) / 1000, abs=0.01)
    assert stats["left_right_pairs"] == [{"right": "RightParotid", "left": "LeftParotid"}]


def test_model_stats_command_keeps_the_package_valid(tmp_path, capsys):
    import shutil

    from unetseg_engine.cli import main
    from unetseg_engine.modelpkg import get_model, load_package, sha256_of

    package = tmp_path / "model"
    shutil.copytree(get_model(None).path, package)
    weights = sha256_of(package / "model.pt")
    dataset = _two_case_dataset(tmp_path / "ds")
    before = (package / "metadata.json").read_bytes()
    # pt_201 and pt_222 are validation cases of the shipped model: its training cases are not there
    assert main(["model-stats", str(package), "--dataset", str(dataset), "-q"]) == 2
    assert "None of the model's" in capsys.readouterr().err
    assert (package / "metadata.json").read_bytes() == before
    assert main(["model-stats", str(package), "--dataset", str(dataset), "--all-cases", "-q"]) == 0
    loaded = load_package(package)  # validated against the schema, weights checksum checked
    assert set(loaded.meta["review"]["labels"]) == set(OPENKBP_LABELS)
    assert loaded.meta["review"]["source"]["cases"] == 2
    assert sha256_of(package / "model.pt") == weights == loaded.meta["weights"]["sha256"]


def test_worker_returns_the_review_and_the_uncertainty_map(tiny_package, tmp_path):
    from unetseg_engine.worker import Worker
    from unetseg_engine.workerprotocol import parse_request

    voxels = np.random.default_rng(0).integers(-1000, 1000, (20, 24, 24)).astype(np.int16)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))  # the header carries the geometry
    sitk.WriteImage(image, str(tmp_path / "input.nrrd"), useCompression=False)
    request = {"cmd": "segment", "id": "job", "model": str(tiny_package.path), "device": "cpu",
               "runtime": "torch", "uncertainty": True, "inputs": [{"path": str(tmp_path / "input.nrrd")}],
               "output_dir": str(tmp_path / "out")}
    out = io.StringIO()
    worker = Worker(out)
    worker.segment(parse_request(request))
    done = [json.loads(line) for line in out.getvalue().splitlines()][-1]
    assert done["event"] == "done", done
    assert [e["name"] for e in done["review"]] == ["Structure1", "Structure2", "Structure3"]
    u = sitk.ReadImage(done["uncertainty"])
    assert u.GetSize() == (24, 24, 20) and u.GetSpacing() == (2.0, 2.0, 3.0) and u.GetOrigin() == (1, 2, 3)
    out.seek(0)
    out.truncate()
    worker.segment(parse_request(dict(request, uncertainty=False, id="job2")))
    done = [json.loads(line) for line in out.getvalue().splitlines()][-1]
    assert done["uncertainty"] is None and len(done["review"]) == 3


@pytest.mark.parametrize("shape", [(40, 50, 60), (1, 1, 1), (3, 1, 7)])
def test_label_counts_match_a_whole_array_bincount(shape):
    """The volumes count only the box around the labels (a whole-array bincount is a 630 MB int64
    temporary on a clinical CT): the counts must still be those of the whole array."""
    from unetseg_engine.review import label_counts

    rng = np.random.default_rng(7)
    array = np.zeros(shape, np.uint8)
    if array.size > 1:
        box = tuple(slice(s // 3, max(s // 3 + 1, 2 * s // 3)) for s in shape)
        array[box] = rng.integers(0, 9, array[box].shape)
        array[-1, -1, -1] = 3  # a label in the far corner widens the box to the whole array
    expected = np.bincount(array.ravel(), minlength=9)[:8]
    assert np.array_equal(label_counts(array, 8), expected)
    assert label_counts(np.zeros(shape, np.uint8), 8)[0] == array.size


def test_label_independent_maps_computed_once_give_each_labels_own_measures():
    """An untrained network's labels are everywhere, so their crops together exceed the grid; then
    the softmax entropy and the tempered sums are computed once over the whole grid and cropped per
    label. Each label's measures must be exactly those computed in its own crop, and the square roots
    that stand for powers 1/2 and 1/4 must match the powers."""
    import torch

    from unetseg_engine import review

    rng = np.random.default_rng(7)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(5, 30, 34, 28)).astype(np.float32)),
                          0).numpy()
    top = probs.argmax(0)
    shared: dict = {}
    for channel in range(1, 5):
        mask = top == channel
        crop = review._crop(mask)
        own = review.confidence_measures(probs, mask, channel, False, crop)
        assert review.confidence_measures(probs, mask, channel, False, crop, None, shared) == own
    assert set(shared) == {"entropy", *[("total", t) for t in review.TEMPERATURES.values()]}
    x = rng.random(100_000).astype(np.float32)
    for t in (2, 4, 3):
        np.testing.assert_allclose(review._root(x, t), np.power(x, np.float32(1 / t)), rtol=2e-7)
