"""The back-to-the-input-grid half of inference (``inputgrid.py``) on its own, without a network or
the shared data: probabilities made up on a model grid, brought onto oblique, flipped and anisotropic
input grids, against the direct way (every class linearly interpolated at full resolution, argmax)."""

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import OBLIQUE_FLIPPED, tiny_meta
from unetseg_engine.boxes import Box
from unetseg_engine.inputgrid import REGION_THRESHOLD, argmax_on, labels_on_input_grid, region_box
from unetseg_engine.modeldesc import ModelDescription
from unetseg_engine.preprocess import Prepared, model_grid

WEIGHTS = {"file": "model.pt", "sha256": "0" * 64}


def description(**changes) -> ModelDescription:
    meta = dict(tiny_meta(n_labels=2), weights=WEIGHTS)
    labels = changes.pop("labels", None)
    if labels is not None:
        meta["labels"] = labels
    meta["output"] = dict(meta["output"], **changes)
    return ModelDescription.from_meta(meta)


def reference_image(direction, size=(46, 40, 30), spacing=(1.1, 1.4, 2.5)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    image.SetOrigin((-20.0, 15.0, 40.0))
    return image


def blob_probabilities(grid: sitk.Image, reference: sitk.Image, n_classes: int = 3, noise: float = 0.3,
                       seed: int = 0, width_mm: float = 7.0) -> np.ndarray:
    """Softmax of smooth logits (a blob per organ, placed in the reference's field of view, plus
    noise): organs with ragged boundaries that do not follow either grid."""
    rng = np.random.default_rng(seed)
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    points = np.array(grid.GetOrigin()) + (idx * grid.GetSpacing()) @ direction.T
    centre = np.array(reference.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in reference.GetSize()]))
    logits = [np.zeros(len(points))]
    for c in range(1, n_classes):
        where = centre + rng.uniform(-12, 12, 3)
        logits.append(6.0 - np.sum((points - where) ** 2, axis=1) / (2 * width_mm ** 2))
    stack = np.stack(logits).reshape(n_classes, *size) + rng.normal(0, noise, (n_classes, *size))
    stack = stack.transpose(0, 3, 2, 1)  # (C, z, y, x)
    e = np.exp(stack - stack.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


def prepared_for(reference: sitk.Image, crop: Box | None = None, spacing=(3.0, 3.0, 4.0)) -> Prepared:
    box = crop or Box.of((0, 0, 0), reference.GetSize())
    grid = model_grid(reference, box, spacing)
    return Prepared(np.zeros((1, 1, 1, 1), np.float32), grid, box, reference)


def direct_interpolation(probs: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Every class resampled onto the whole input grid (background 1 outside the model grid), then
    argmax (ties to the lower class); 0 outside the crop box."""
    channels = []
    for c in range(probs.shape[0]):
        image = sitk.GetImageFromArray(probs[c])
        image.CopyInformation(prepared.grid)
        channels.append(sitk.GetArrayFromImage(sitk.Resample(
            image, prepared.reference, sitk.Transform(), sitk.sitkLinear, 1.0 if c == 0 else 0.0,
            sitk.sitkFloat32)))
    classes = np.argmax(np.stack(channels), axis=0)
    outside = np.ones(classes.shape, bool)
    outside[prepared.box.slices_kji()] = False
    classes[outside] = 0
    return classes


GRIDS = {
    "oblique, flipped, anisotropic": OBLIQUE_FLIPPED,
    "axis-aligned, permuted and flipped": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),
}


# (noise, blob width): smooth organs, where only boundary voxels are interpolated; and a noisy
# network, where every class is interpolated everywhere (``MIXED_FRACTION_LIMIT``)
PROBABILITIES = {"smooth": (0.05, 4.0, False), "noisy (every class interpolated)": (3.0, 7.0, True)}


@pytest.mark.parametrize("direction", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("noise, width_mm, everywhere", PROBABILITIES.values(), ids=PROBABILITIES.keys())
def test_labels_match_full_resolution_interpolation(direction, noise, width_mm, everywhere, monkeypatch):
    from unetseg_engine import inputgrid

    calls = []
    real = inputgrid._argmax_resampled
    monkeypatch.setattr(inputgrid, "_argmax_resampled", lambda *a: calls.append(1) or real(*a))
    reference = reference_image(direction)
    prepared = prepared_for(reference)
    probs = blob_probabilities(prepared.grid, reference, noise=noise, width_mm=width_mm)
    label_map, masks = labels_on_input_grid(probs, prepared, description(), postprocess=False)
    assert bool(calls) == everywhere  # the path this case is for
    ours = sitk.GetArrayFromImage(label_map)
    expected = direct_interpolation(probs, prepared)
    assert masks is None and ours.dtype == np.uint8
    assert label_map.GetSize() == reference.GetSize()
    assert np.allclose(label_map.GetDirection(), reference.GetDirection())
    assert label_map.GetOrigin() == reference.GetOrigin() and label_map.GetSpacing() == reference.GetSpacing()
    for value in (1, 2):  # both organs are really there, with boundaries to get right
        assert (expected == value).sum() > 500
    np.testing.assert_array_equal(ours, expected)


def test_only_the_crop_box_gets_labels():
    reference = reference_image(OBLIQUE_FLIPPED)
    crop = Box.of((8, 5, 4), (30, 28, 20))
    prepared = prepared_for(reference, crop)
    probs = blob_probabilities(prepared.grid, reference, noise=0.05, width_mm=4.0)
    ours = sitk.GetArrayFromImage(labels_on_input_grid(probs, prepared, description(),
                                                       postprocess=False)[0])
    outside = np.ones(ours.shape, bool)
    outside[crop.slices_kji()] = False
    assert ours[crop.slices_kji()].any() and not ours[outside].any()
    np.testing.assert_array_equal(ours, direct_interpolation(probs, prepared))


def test_region_box_holds_every_plausible_voxel():
    reference = reference_image(OBLIQUE_FLIPPED, size=(90, 80, 40))
    prepared = prepared_for(reference)
    probs = blob_probabilities(prepared.grid, reference, noise=0.1, width_mm=3.0)
    box = region_box(probs, prepared, [1, 2])
    assert box is not None
    plausible = direct_interpolation(probs, prepared) != 0
    inside = np.zeros(plausible.shape, bool)
    inside[box.slices_kji()] = True
    assert plausible.any() and not (plausible & ~inside).any()
    assert inside.sum() < 0.5 * inside.size  # a box around the organs, not the whole scan
    probs[1:] = REGION_THRESHOLD / 2
    assert region_box(probs, prepared, [1, 2]) is None


def test_argmax_on_a_sub_box_is_the_same_as_on_the_whole_grid():
    from unetseg_engine.boxes import box_reference

    reference = reference_image(OBLIQUE_FLIPPED)
    prepared = prepared_for(reference)
    probs = blob_probabilities(prepared.grid, reference, noise=0.05, width_mm=4.0)
    whole = argmax_on(probs, prepared, reference)
    sub = Box.of((5, 7, 3), (20, 15, 12))
    np.testing.assert_array_equal(argmax_on(probs, prepared, box_reference(reference, sub)),
                                  whole[sub.slices_kji()])


def test_label_values_past_255_come_back_as_uint16():
    reference = reference_image(OBLIQUE_FLIPPED)
    prepared = prepared_for(reference)
    probs = blob_probabilities(prepared.grid, reference, noise=0.05, width_mm=4.0)
    labels = [{"value": 7, "name": "A", "color": [1, 2, 3]}, {"value": 300, "name": "B", "color": [1, 2, 3]}]
    label_map, _ = labels_on_input_grid(probs, prepared, description(labels=labels), postprocess=False)
    ours = sitk.GetArrayFromImage(label_map)
    expected = np.array([0, 7, 300])[direct_interpolation(probs, prepared)]
    assert ours.dtype == np.uint16 and set(np.unique(ours)) == {0, 7, 300}
    np.testing.assert_array_equal(ours, expected)


def test_multilabel_masks_are_each_channel_above_the_threshold():
    reference = reference_image(OBLIQUE_FLIPPED)
    prepared = prepared_for(reference)
    probs = blob_probabilities(prepared.grid, reference)[1:]  # no background channel: sigmoid outputs
    probs[1] = np.roll(probs[0], 2, axis=2)  # overlapping with the first
    threshold = 0.4
    desc = description(type="multilabel", threshold=threshold)
    label_map, masks = labels_on_input_grid(probs, prepared, desc, postprocess=False)
    assert masks is not None and set(masks) == {1, 2}
    full = []
    for c, value in enumerate((1, 2)):
        box, mask = masks[value]
        image = sitk.GetImageFromArray(probs[c])
        image.CopyInformation(prepared.grid)
        direct = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear,
                                                      0.0, sitk.sitkFloat32)) > threshold
        placed = np.zeros(direct.shape, bool)
        placed[box.slices_kji()] = mask
        assert direct.sum() > 500
        np.testing.assert_array_equal(placed, direct)
        full.append(placed)
    assert (full[0] & full[1]).sum() > 100  # overlapping masks stay overlapping
    ours = sitk.GetArrayFromImage(label_map)
    assert set(np.unique(ours[full[0] | full[1]])) == {1, 2} and not ours[~(full[0] | full[1])].any()


def test_postprocessing_keeps_the_largest_component():
    reference = reference_image(np.eye(3), size=(40, 40, 30), spacing=(2.0, 2.0, 2.0))
    prepared = prepared_for(reference)
    probs = np.zeros((2, *prepared.grid.GetSize()[::-1]), np.float32)
    probs[0] = 1.0
    probs[:, 2:6, 2:8, 2:8] = [[[[0.0]]], [[[1.0]]]]  # the organ
    probs[:, 8:9, 20:21, 20:21] = [[[[0.0]]], [[[1.0]]]]  # a stray island
    labels = [{"value": 1, "name": "A", "color": [1, 2, 3], "postprocessing": {"largest_component": True}}]
    desc = description(labels=labels)
    raw = sitk.GetArrayFromImage(labels_on_input_grid(probs, prepared, desc, postprocess=False)[0])
    cleaned = sitk.GetArrayFromImage(labels_on_input_grid(probs, prepared, desc)[0])
    from scipy import ndimage

    assert ndimage.label(raw)[1] == 2 and ndimage.label(cleaned)[1] == 1
    assert cleaned.sum() > 0.8 * raw.sum() and np.all(cleaned <= raw)


def clamped_interpolation(logits: np.ndarray, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, scores): every class linearly interpolated at every input voxel, coordinates clamped to
    the model grid as nnU-Net's logits are (no default value outside), each voxel mapped through
    SimpleITK's own physical-point transforms."""
    from scipy import ndimage

    reference, grid = prepared.reference, prepared.grid
    size = reference.GetSize()
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1).reshape(-1, 3)
    ijk = kji[:, ::-1]
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    points = np.array(reference.GetOrigin()) + (ijk * reference.GetSpacing()) @ direction.T
    xyz = np.array([grid.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
    zyx = np.clip(xyz[:, ::-1], 0, np.array(logits.shape[1:]) - 1).T
    scores = np.stack([ndimage.map_coordinates(logits[c].astype(np.float64), zyx, order=1, mode="nearest")
                       for c in range(logits.shape[0])])
    return np.argmax(scores, axis=0).reshape(size[::-1]), scores.reshape(-1, *size[::-1])


@pytest.mark.parametrize("direction", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("noise", [0.05, 3.0], ids=["smooth", "noisy"])
def test_logits_slab_by_slab_match_every_class_interpolated(direction, noise, monkeypatch):
    """nnU-Net's logits (clamped at the grid's edges), in slabs of a few slices: sparse boundary
    voxels, and on an axis-aligned grid, slabs that are mostly boundary (an untrained network) by
    three 1-D interpolations per class. Both equal every class interpolated at every voxel."""
    from unetseg_engine import inputgrid

    monkeypatch.setattr(inputgrid, "SLAB_VOXELS", 46 * 40 * 4)  # 8 slabs of 4 slices
    separable = []
    real = inputgrid._argmax_separable
    monkeypatch.setattr(inputgrid, "_argmax_separable", lambda *a: separable.append(1) or real(*a))
    reference = reference_image(direction)
    prepared = prepared_for(reference)
    probs = blob_probabilities(prepared.grid, reference, noise=noise, width_mm=7.0 if noise > 1 else 4.0)
    logits = np.log(np.maximum(probs, 1e-12))
    ours = argmax_on(logits, prepared, reference, logits=True)
    expected, scores = clamped_interpolation(logits, prepared)
    axis_aligned = direction is GRIDS["axis-aligned, permuted and flipped"]
    # the noisy network's slabs are all boundary; the smooth organs' are mostly not
    assert len(separable) == (0 if not axis_aligned else 8 if noise > 1 else 3)
    for value in (1, 2):
        assert (expected == value).sum() > 500
    differ = np.nonzero(ours != expected)
    if separable:
        # float32 1-D steps against float64 trilinear weights: only near-ties may differ
        tie = np.abs(scores[(ours[differ], *differ)] - scores[(expected[differ], *differ)])
        assert differ[0].size <= 5 and (tie < 1e-4).all()
    else:
        assert differ[0].size == 0
