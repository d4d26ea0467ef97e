"""Golden test: the shipped default model on 2 OpenKBP validation cases, on CPU, against the clinical
contours (Dice floors) and against its own recorded output (organ centroids within 1 mm, voxel counts
within 3 %). A broken weight file, a flipped axis, a wrong window, a resampling bug or labels shifted
by one slice along any axis fails it."""

import numpy as np
import pytest
import SimpleITK as sitk
from test_geometry import oblique_copy

from helpers import OPENKBP_LABELS, golden_differences, openkbp
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor
from unetseg_engine.metrics import dice
from unetseg_engine.modelpkg import get_model, shipped_models_dir

# Per-organ floors, about 0.1 below the lower of what the shipped model measured on these two cases
# (pt_201, pt_236; `unetseg evaluate`, see the model's metadata.json "performance"), so that real
# regressions fail and noise does not.
FLOORS = {"Brainstem": 0.77, "SpinalCord": 0.62, "RightParotid": 0.65, "LeftParotid": 0.64,
          "Esophagus": 0.49, "Larynx": 0.47, "Mandible": 0.73}  # model 1.2.0
CASES = ["pt_201", "pt_236"]
DEFAULT = "openkbp-hn-oar"


@pytest.fixture(scope="module")
def predictors():
    """A loaded CPU predictor per shipped model id, each built once for the module."""
    loaded: dict[str, Predictor] = {}

    def predictor_for(model_id: str) -> Predictor:
        if model_id not in loaded:
            if not (shipped_models_dir() / model_id / "metadata.json").is_file():
                pytest.fail(f"the shipped model SlicerUNetSeg/Resources/Models/{model_id} is missing")
            loaded[model_id] = Predictor(device="cpu")
            loaded[model_id].load(get_model(model_id))
        return loaded[model_id]

    return predictor_for


@pytest.fixture(scope="module")
def predictor(predictors):
    return predictors(DEFAULT)


@pytest.fixture(scope="module")
def predicted(predictor):
    """The default model's label map per case, predicted once for the module."""
    done: dict[str, sitk.Image] = {}

    def label_map(case: str) -> sitk.Image:
        if case not in done:
            done[case] = predictor.predict([read_image(openkbp(case)[0])]).label_map
        return done[case]

    return label_map


def organ_dice(label_map: sitk.Image, reference: sitk.Image) -> dict[str, float]:
    p, r = sitk.GetArrayViewFromImage(label_map), sitk.GetArrayViewFromImage(reference)
    return {name: dice(p == value, r == value) for value, name in enumerate(OPENKBP_LABELS, start=1)}


def test_default_model_metadata_names_the_seven_organs_with_snomed_codes():
    package = get_model(None)
    assert package.id == "openkbp-hn-oar"
    assert package.label_names == OPENKBP_LABELS
    codes = {label["name"]: label["terminology"]["type"]["code"] for label in package.labels}
    assert codes["Brainstem"] == "15926001" and codes["Mandible"] == "91609006"
    assert package.labels[2]["terminology"]["type_modifier"]["meaning"] == "Right"
    assert package.meta["performance"]["mean_dice"] >= 0.5
    assert package.weights_bytes < 20e6


@pytest.mark.parametrize("model_id", [DEFAULT])
@pytest.mark.parametrize("case", CASES)
def test_shipped_model_dice_per_organ_on_validation_cases(predicted, model_id, case):
    ct_path, label_path = openkbp(case)
    scores = organ_dice(predicted(case), sitk.ReadImage(str(label_path)))
    low = {n: round(d, 3) for n, d in scores.items() if d < FLOORS[n]}
    assert not low, f"{case}: organs below their Dice floor: {low} (all: {scores})"


@pytest.mark.parametrize("case", CASES)
def test_shipped_model_gives_its_golden_output(predicted, case):
    assert golden_differences(predicted(case), case) == []


def shifted(label_map: sitk.Image, axis_kji: int, voxels: int) -> sitk.Image:
    """The same labels moved by ``voxels`` along one array axis (zeros come in), on the same grid."""
    array = sitk.GetArrayFromImage(label_map)
    moved = np.zeros_like(array)
    source = [slice(None)] * 3
    target = [slice(None)] * 3
    source[axis_kji] = slice(0, -voxels) if voxels > 0 else slice(-voxels, None)
    target[axis_kji] = slice(voxels, None) if voxels > 0 else slice(0, voxels)
    moved[tuple(target)] = array[tuple(source)]
    image = sitk.GetImageFromArray(moved)
    image.CopyInformation(label_map)
    return image


@pytest.mark.parametrize("voxels", [1, -1])
@pytest.mark.parametrize("axis_kji", [0, 1, 2])
def test_the_golden_check_catches_a_one_slice_shift(predicted, axis_kji, voxels):
    """The Dice floors miss a 1-slice shift along the slice axis (k) on both cases (measured); the
    golden check must catch a shift along every axis."""
    problems = golden_differences(shifted(predicted(CASES[0]), axis_kji, voxels), CASES[0])
    assert sum("centroid" in p for p in problems) >= 5, problems


def test_default_model_on_an_oblique_copy_lands_on_the_right_voxels(predictor):
    ct_path, label_path = openkbp(CASES[0])
    oblique = oblique_copy(read_image(ct_path))
    reference = sitk.Resample(sitk.ReadImage(str(label_path)), oblique, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    scores = organ_dice(predictor.predict([oblique]).label_map, reference)
    big = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Mandible"]
    assert np.mean([scores[n] for n in big]) > np.mean([FLOORS[n] for n in big]), scores
    # the two parotids must not swap sides: left/right is where a flipped axis shows first
    assert scores["RightParotid"] > 0.5 and scores["LeftParotid"] > 0.5, scores


def test_mirror_tta_keeps_each_parotid_on_its_own_side(tmp_path):
    """Left-right mirror TTA must swap the paired labels of the mirrored pass: without the swap, the
    right parotid's mirrored prediction lands on the left one (measured: Dice 0.48 / 0.00 instead of
    0.80 / 0.76 on pt_201)."""
    import json
    import shutil

    copy = tmp_path / "openkbp-hn-oar"
    shutil.copytree(shipped_models_dir() / "openkbp-hn-oar", copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["inference"].update(tta_flip_axes=["x"], tta_mirror_pairs=[["RightParotid", "LeftParotid"]])
    (copy / "metadata.json").write_text(json.dumps(meta))
    predictor = Predictor(device="cpu", tta=True)
    predictor.load(get_model(copy))
    ct_path, label_path = openkbp(CASES[0])
    scores = organ_dice(predictor.predict([read_image(ct_path)]).label_map,
                        sitk.ReadImage(str(label_path)))
    assert scores["RightParotid"] > FLOORS["RightParotid"], scores
    assert scores["LeftParotid"] > FLOORS["LeftParotid"], scores
