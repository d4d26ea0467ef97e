"""Review what the network drew: a confidence per label, an uncertainty map, and plausibility flags.

Everything here works from the class probabilities the predictor already has, on the model grid (a few
million voxels at most), so it costs little next to the network; only the optional uncertainty map is
brought back to the input grid, inside the region box, as uint8.

One review entry per label (``SegmentationResult.review``)::

    {"value": 3, "name": "RightParotid", "volume_ml": 24.1, "confidence": 0.83,
     "flags": [{"code": "volume_low", "message": "..."}], "focus_ras": [x, y, z] or None,
     "measures": {...every candidate confidence measure...}}

``confidence`` is ``CONFIDENCE_MEASURE``, chosen among ``MEASURES`` on the shipped model's 34
validation patients by ``scripts/confidence_vs_dice.py`` (Spearman 0.33 with Dice over 178 (patient,
organ) pairs, the best of the cheap candidates; README "Reviewing the result"); ``focus_ras`` is the
RAS point (mm) at the centre of the most uncertain connected chunk on the segment's border:
where to look first.

Flags (``FLAGS``) compare the result with statistics recorded from the training labels into the
model's metadata (``meta["review"]``, written by ``label_statistics`` at export or by
``unetseg model-stats``) and with the anatomy the metadata declares (left/right pairs). A model
without those statistics gets confidences and no flags.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

# The fixed set of flag codes, and what each means (the CLI, the worker and the panel show ``message``).
FLAGS = {
    "missing": "an organ found in (nearly) every training case was not found, or only a sliver of it",
    "volume_low": "the volume is below the smallest seen in training",
    "volume_high": "the volume is above the largest seen in training",
    "left_right_swapped": "a left/right pair looks swapped: the right organ lies left of the left one, "
                          "or the anatomy looks mirrored (a flipped scan whose header was not updated)",
    "fragmented": "the network's output came in more large pieces than any training label had",
    "position": "the centre lies outside the range seen in training, relative to the body's box "
                "(left-right and front-back; not head-foot, which depends on the scan's length)",
}
CONFIDENCE_MEASURE = "soft_dice_t2"
MEASURES = ("max_prob", "entropy", "border_max_prob", "soft_dice", "soft_dice_t2", "soft_dice_t4",
            "uncertain_band", "interior", "interior_soft_dice")
TEMPERATURES = {"soft_dice_t2": 2.0, "soft_dice_t4": 4.0}
# A voxel counts as plausibly some organ above this probability (as the predictor's REGION_THRESHOLD).
PLAUSIBLE = 0.01
# A component is "large" from this fraction of the organ's largest component.
LARGE_COMPONENT = 0.2
# Below this fraction of the median training volume, an organ counts as missing, not small.
MISSING_FRACTION = 0.2
# An organ is expected (its absence flagged) when this fraction of the training cases that contoured
# it had it.
EXPECTED_FRACTION = 0.9
POSITION_MARGIN = 0.03  # of the body box, beyond the training range, before ``position`` is raised
SIDE_WORDS = {"right": ("24028007", "right"), "left": ("7771000", "left")}


# ---- geometry helpers ------------------------------------------------------------------------
def body_bounds(image: sitk.Image, box) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (mm) of the foreground ``box`` (input index space) of ``image``."""
    from itertools import product

    corners = [image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
               for c in product(*[(s - 0.5, s + n - 0.5) for s, n in zip(box.start, box.size)])]
    points = np.array(corners)
    return points.min(axis=0), points.max(axis=0)


def lps_to_ras(point) -> list[float]:
    return [-float(point[0]), -float(point[1]), float(point[2])]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (26-connected): the label array and each component's voxel count."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:]


def large_component_count(mask: np.ndarray) -> int:
    """Components holding at least ``LARGE_COMPONENT`` of the largest one's voxels."""
    if not mask.any():
        return 0
    _, sizes = _components(mask)
    return int((sizes >= LARGE_COMPONENT * sizes.max()).sum())


def _crop(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...] | None:
    from .boxes import bounding_box

    return bounding_box(mask, margin)


# ---- confidence -------------------------------------------------------------------------------
def _uncertainty(probs: np.ndarray, crop, multilabel: bool, channel: int | None = None,
                 shared: dict | None = None) -> np.ndarray:
    """Normalised entropy (0 certain .. 1 uniform) of the class distribution inside ``crop``.

    Multi-label models: the binary entropy of ``channel`` (or, for the map, the largest over labels).
    ``shared`` (softmax models; see ``build_review``): computed once over the whole grid, then cropped.
    """
    if shared is not None and not multilabel:
        if "entropy" not in shared:
            shared["entropy"] = _uncertainty(probs, (slice(None),) * (probs.ndim - 1), False)
        return shared["entropy"][crop]
    eps = np.float32(1e-7)
    if multilabel:
        channels = [channel] if channel is not None else range(probs.shape[0])
        out = np.zeros(probs[0][crop].shape, np.float32)  # entropies are >= 0: the largest is kept
        for c in channels:
            p = np.clip(probs[c][crop], eps, 1 - eps)
            h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
            out = np.maximum(out, h)
        return out.astype(np.float32)
    h = np.zeros(probs[0][crop].shape, np.float32)
    for c in range(probs.shape[0]):
        p = probs[c][crop]
        h -= p * np.log(np.maximum(p, eps))
    h /= np.float32(math.log(probs.shape[0]))
    return h


def confidence_measures(probs: np.ndarray, mask: np.ndarray, channel: int, multilabel: bool,
                        crop, unc: np.ndarray | None = None, shared: dict | None = None
                        ) -> dict[str, float]:
    """Every candidate confidence of one label, from its model-grid ``mask`` and the probabilities.

    - ``max_prob``: mean probability of the label inside its mask.
    - ``entropy``: mean 1 - normalised entropy inside the mask and on its one-voxel border shell.
    - ``border_max_prob``: mean of the largest class probability on the border shell (both sides).
    - ``soft_dice``: 2 sum_mask(p) / (sum(p) + |mask|), the Dice the probabilities expect between
      the mask and a reference drawn from them: low when much probability lies outside the mask.
    - ``soft_dice_t2``, ``soft_dice_t4``: the same with the probabilities softened by a temperature
      (p^(1/T), renormalised over classes; as dividing the logits by T), which counters the
      network's overconfidence, so that thin organs, whose voxels are mostly border, score lower.

    ``unc``: ``_uncertainty`` in ``crop``, if the caller has it; ``shared``: see ``build_review``.
    """
    from scipy import ndimage

    m = mask[crop]
    p = probs[channel][crop]
    inner = ndimage.binary_erosion(m)
    shell = ndimage.binary_dilation(m) & ~inner
    if unc is None:
        unc = _uncertainty(probs, crop, multilabel, channel if multilabel else None, shared)
    top = np.maximum(p, 1 - p) if multilabel else np.max(probs[(slice(None),) + crop], axis=0)
    inside = float(p[m].mean())
    out = {
        "max_prob": inside,
        "entropy": float(1.0 - unc[m | shell].mean()),
        "border_max_prob": float(top[shell].mean()) if shell.any() else inside,
        "soft_dice": _soft_dice(p, m),
    }
    for name, t in TEMPERATURES.items():
        out[name] = _soft_dice(_tempered(probs, channel, crop, t, multilabel, shared), m)
    n = float(m.sum())
    band = float(((p > 0.05) & (p < 0.95)).sum())
    out["uncertain_band"] = 1.0 - band / (n + band)
    out["interior"] = float(inner.sum()) / n
    out["interior_soft_dice"] = out["interior"] * out["soft_dice_t2"]
    return out


def _soft_dice(p: np.ndarray, m: np.ndarray) -> float:
    return 2.0 * float(p[m].sum()) / (float(p.sum()) + float(m.sum()))


def _root(x: np.ndarray, t: float) -> np.ndarray:
    """``x ** (1 / t)``; square roots for t = 2 and 4 (5x faster than a float power, same to 1 ulp)."""
    if t == 2:
        return np.sqrt(x)
    if t == 4:
        return np.sqrt(np.sqrt(x))
    return np.power(x, np.float32(1.0 / t))


def _tempered(probs: np.ndarray, channel: int, crop, t: float, multilabel: bool,
              shared: dict | None = None) -> np.ndarray:
    """``channel``'s probability at temperature ``t`` (logits / t) inside ``crop``. ``shared``
    (softmax models; see ``build_review``): the sum over classes computed once over the whole grid."""
    eps = np.float32(1e-12)
    if multilabel:
        p = probs[channel][crop]
        a, b = _root(p + eps, t), _root(1 - p + eps, t)
        return a / (a + b)
    num = _root(probs[channel][crop] + eps, t)
    if shared is not None:
        key = ("total", t)
        if key not in shared:
            shared[key] = _tempered_total(probs, (slice(None),) * (probs.ndim - 1), t)
        return num / shared[key][crop]
    return num / _tempered_total(probs, crop, t)


def _tempered_total(probs: np.ndarray, crop, t: float) -> np.ndarray:
    eps = np.float32(1e-12)
    total = np.zeros(probs[0][crop].shape, np.float32)
    for c in range(probs.shape[0]):
        total += _root(probs[c][crop] + eps, t)
    return total


def _focus(unc: np.ndarray, mask: np.ndarray, crop, grid: sitk.Image) -> list[float]:
    """RAS (mm) of the centre of the most uncertain connected chunk on ``mask``'s border."""
    from scipy import ndimage

    m = mask[crop]
    band = ndimage.binary_dilation(m, iterations=1) & ~ndimage.binary_erosion(m, iterations=1)
    if not band.any():
        band = m
    u = np.where(band, unc, 0.0)
    values = u[band]
    chunk = band & (u >= max(float(np.percentile(values, 75)), 1e-6))
    if not chunk.any():
        chunk = band
    labels, sizes = _components(chunk)
    weight = ndimage.sum_labels(u, labels, index=np.arange(1, sizes.size + 1))
    best = int(np.argmax(weight)) + 1
    voxels = np.argwhere(labels == best)
    centre = voxels.mean(axis=0)
    nearest = voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]  # on the chunk, not beside it
    kji = [int(nearest[a] + (crop[a].start or 0)) for a in range(3)]
    return lps_to_ras(grid.TransformIndexToPhysicalPoint([kji[2], kji[1], kji[0]]))


# ---- the review -------------------------------------------------------------------------------
def model_grid_masks(probs: np.ndarray, model) -> dict[int, np.ndarray]:
    """Each label's raw network mask on the model grid (argmax, or threshold for multi-label)."""
    if model.multilabel:
        threshold = model.meta["output"].get("threshold", 0.5)
        return {label["value"]: probs[c] > threshold for c, label in enumerate(model.labels)}
    from .inputgrid import argmax_first_axis as _argmax_first_axis

    top = _argmax_first_axis(probs, np.uint8 if probs.shape[0] < 255 else np.uint16)
    return {label["value"]: top == c + 1 for c, label in enumerate(model.labels)}


def input_volumes_ml(label_map: sitk.Image, masks, model) -> dict[int, float]:
    """Each label's volume (ml) in the result the user gets (after postprocessing)."""
    voxel_ml = float(np.prod(label_map.GetSpacing())) / 1000.0
    if masks is not None:
        return {value: float(mask.sum()) * voxel_ml for value, (box, mask) in masks.items()}
    array = sitk.GetArrayViewFromImage(label_map)
    values = [label["value"] for label in model.labels]
    counts = label_counts(array, max(values) + 1)
    return {v: float(counts[v]) * voxel_ml for v in values}


def label_counts(array: np.ndarray, n: int) -> np.ndarray:
    """Voxel counts of the values 0..n-1 of a label array (values >= n are not counted).

    Only the box around the non-zero voxels is counted, slab by slab: ``np.bincount`` widens to
    int64, which over a whole 512 x 512 x 300 label map is a 630 MB temporary and 0.5 s.
    """
    counts = np.zeros(n, np.int64)
    box = []
    for axis in range(array.ndim):
        hit = np.flatnonzero(np.any(array, axis=tuple(a for a in range(array.ndim) if a != axis)))
        if hit.size == 0:
            counts[0] = array.size
            return counts
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    inner = array[tuple(box)]
    for k in range(0, inner.shape[0], 16):
        counts += np.bincount(inner[k:k + 16].ravel(), minlength=n)[:n]
    counts[0] += array.size - inner.size
    return counts


def build_review(probs: np.ndarray, prepared, model, label_map: sitk.Image, masks) -> list[dict]:
    """The review entries of one result (see the module docstring)."""
    grid = prepared.grid
    multilabel = model.multilabel
    raw = model_grid_masks(probs, model)
    volumes = input_volumes_ml(label_map, masks, model)
    body_lo, body_hi = body_bounds(prepared.reference, prepared.box)
    entries: list[dict[str, Any]] = []
    found: dict[str, dict[str, Any]] = {}
    crops = {value: _crop(mask) for value, mask in raw.items()}
    # A softmax model's entropy and tempered sums do not depend on the label: when the labels' crops
    # together exceed the grid (an untrained or confused network, whose labels are everywhere), they
    # are computed once over the whole grid; otherwise each label computes them in its own crop
    covered = sum(int(np.prod([s.stop - s.start for s in crop])) for crop in crops.values() if crop)
    shared: dict | None = {} if not multilabel and covered > probs[0].size else None
    for c, label in enumerate(model.labels):
        value = label["value"]
        channel = c if multilabel else c + 1
        mask = raw[value]
        entry: dict[str, Any] = {"value": value, "name": label["name"],
                                 "volume_ml": round(volumes.get(value, 0.0), 3), "confidence": None,
                                 "flags": [], "focus_ras": None, "measures": {}}
        crop = crops[value]
        if crop is not None:
            unc = _uncertainty(probs, crop, multilabel, channel if multilabel else None, shared)
            measures = confidence_measures(probs, mask, channel, multilabel, crop, unc, shared)
            entry["measures"] = {k: round(v, 4) for k, v in measures.items()}
            entry["confidence"] = entry["measures"][CONFIDENCE_MEASURE]
            entry["focus_ras"] = [round(v, 2) for v in _focus(unc, mask, crop, grid)]
            kji = np.argwhere(mask).mean(axis=0)
            centre = np.array(grid.TransformContinuousIndexToPhysicalPoint([float(kji[2]), float(kji[1]),
                                                                           float(kji[0])]))
            found[label["name"]] = {
                "centre_lps": centre,
                "position": (centre - body_lo) / np.maximum(body_hi - body_lo, 1e-6),
                "components": large_component_count(mask[crop]),
            }
        entries.append(entry)
    stats = model.meta.get("review")
    if stats:
        plausibility_flags(entries, found, stats)
    return entries


def _flag(entry: dict[str, Any], code: str, message: str) -> None:
    assert code in FLAGS, code
    entry["flags"].append({"code": code, "message": message})


def plausibility_flags(entries: list[dict], found: dict[str, dict], review_meta: dict) -> None:
    """Add flags to ``entries`` where the result is unlike the training labels (``meta["review"]``)."""
    per_label = review_meta.get("labels", {})
    for entry in entries:
        s = per_label.get(entry["name"])
        if not s:
            continue
        volume, f = entry["volume_ml"], found.get(entry["name"])
        vmin, vmax = s["volume_ml"]["min"], s["volume_ml"]["max"]
        sliver = MISSING_FRACTION * s["volume_ml"]["median"]
        expected = s.get("present_fraction", 1.0) >= EXPECTED_FRACTION
        if volume < sliver:
            if expected:
                what = "not found" if volume == 0 else f"only {volume:.1f} ml found"
                _flag(entry, "missing", f"{entry['name']} {what}; typically {s['volume_ml']['median']:.0f} "
                                        f"ml in training. Is it inside the scan?")
        elif volume < vmin:
            _flag(entry, "volume_low", f"{volume:.1f} ml, below the training range "
                                       f"{vmin:.1f}-{vmax:.1f} ml")
        elif volume > vmax:
            _flag(entry, "volume_high", f"{volume:.1f} ml, above the training range "
                                        f"{vmin:.1f}-{vmax:.1f} ml")
        if f is None:
            continue
        if f["components"] > s.get("components_max", math.inf):
            _flag(entry, "fragmented", f"the network drew {f['components']} large pieces (training "
                                       f"labels: at most {s['components_max']})")
        pos = s.get("position")
        if pos and volume >= sliver:  # a sliver's centre means little
            off = []
            for axis, word in ((0, "left-right"), (1, "front-back")):
                lo, hi = pos["min"][axis] - POSITION_MARGIN, pos["max"][axis] + POSITION_MARGIN
                if not lo <= f["position"][axis] <= hi:
                    off.append(f"{word} {f['position'][axis]:.2f} (training {pos['min'][axis]:.2f}-"
                               f"{pos['max'][axis]:.2f})")
            if off:
                _flag(entry, "position", "unusual place in the body box: " + "; ".join(off))
    by_name = {e["name"]: e for e in entries}
    for pair in review_meta.get("left_right_pairs", []):
        right, left = found.get(pair["right"]), found.get(pair["left"])
        if right is None or left is None:
            continue
        # LPS: x grows towards the patient's left
        if right["centre_lps"][0] > left["centre_lps"][0]:
            for name in (pair["right"], pair["left"]):
                _flag(by_name[name], "left_right_swapped",
                      f"{pair['right']} lies to the patient's left of {pair['left']}: the labels, or the "
                      "scan's left-right orientation, look swapped")
    # slivers (an organ the scan barely reaches) have no meaningful centre: they give no cue
    solid = {name: f for name, f in found.items() if name in per_label and
             by_name[name]["volume_ml"] >= MISSING_FRACTION * per_label[name]["volume_ml"]["median"]}
    mirrored = mirrored_anatomy(solid, review_meta.get("lateral_cues"))
    if mirrored is not None:
        for pair in review_meta.get("left_right_pairs", []):
            for name in (pair["right"], pair["left"]):
                if name in by_name and not any(flag["code"] == "left_right_swapped"
                                               for flag in by_name[name]["flags"]):
                    _flag(by_name[name], "left_right_swapped", mirrored)


def lateral_llr(centres_x: dict[str, float], cues: dict) -> float | None:
    """Mean log-likelihood ratio, normal over mirrored anatomy, of the organs' left-right offsets.

    Each cue is a pair of organs whose left-right offset (mm) had a consistent sign in training
    (the oesophagus runs slightly left of the midline, say): normal ~ N(mean, sd), mirrored ~
    N(-mean, sd), so each pair contributes 2 d mean / sd^2. Negative: mirrored is likelier.
    """
    terms = []
    for cue in cues.get("pairs", []):
        a, b = cue["labels"]
        if a in centres_x and b in centres_x:
            d = centres_x[a] - centres_x[b]
            terms.append(2.0 * d * cue["mean_mm"] / cue["sd_mm"] ** 2)
    return float(np.mean(terms)) if terms else None


def mirrored_anatomy(found: dict[str, dict], cues: dict | None) -> str | None:
    """A message when the organs' left-right offsets look mirrored compared with training, else None."""
    if not cues:
        return None
    llr = lateral_llr({name: f["centre_lps"][0] for name, f in found.items()}, cues)
    if llr is None or llr >= cues["threshold"]:
        return None
    pairs = ", ".join("/".join(cue["labels"]) for cue in cues["pairs"]
                      if all(n in found for n in cue["labels"]))
    return (f"the anatomy looks mirrored left-right: the left-right offsets of {pairs} are reversed "
            f"compared with training (only {cues['false_alarm_rate']:.0%} of training patients look "
            "this mirrored). Check the scan's orientation: if it was flipped without updating its "
            "header, right and left are swapped")


# ---- the uncertainty map ----------------------------------------------------------------------
def uncertainty_map(probs: np.ndarray, prepared, model, region_box) -> sitk.Image:
    """uint8 map (0 certain .. 255 uniform) on the first input's grid, non-zero only inside the region
    box and where some label is plausible. Computed on the model grid in that region and resampled
    once (linear, uint8); the full-size array is uint8, like the label map."""
    from .preprocess import box_reference

    reference = prepared.reference
    out = np.zeros(reference.GetSize()[::-1], np.uint8)
    if region_box is not None:
        channels = range(probs.shape[0]) if model.multilabel else range(1, probs.shape[0])
        plausible = np.zeros(probs.shape[1:], bool)
        for c in channels:
            plausible |= probs[c] > PLAUSIBLE
        crop = _crop(plausible, margin=1)
        if crop is not None:
            unc = _uncertainty(probs, crop, model.multilabel)
            unc[~plausible[crop]] = 0.0
            small = sitk.GetImageFromArray(np.round(unc * 255).astype(np.uint8))
            small.SetSpacing(prepared.grid.GetSpacing())
            small.SetDirection(prepared.grid.GetDirection())
            small.SetOrigin(prepared.grid.TransformIndexToPhysicalPoint(
                [int(crop[2].start), int(crop[1].start), int(crop[0].start)]))
            ref = box_reference(reference, region_box)
            resampled = sitk.Resample(small, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)
            out[region_box.slices_kji()] = sitk.GetArrayViewFromImage(resampled)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image


# ---- statistics from training labels ------------------------------------------------------------
def side_of(label: dict[str, Any]) -> str | None:
    """'right' or 'left' from a label's terminology modifier or its name, else None."""
    modifier = (label.get("terminology") or {}).get("type_modifier") or {}
    for side, (code, word) in SIDE_WORDS.items():
        if modifier.get("code") == code or label["name"].lower().startswith(word):
            return side
    return None


def declared_pairs(labels: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Left/right pairs: labels whose names differ only by Right/Left (or terminology modifiers)."""
    pairs = []
    by_rest: dict[str, dict[str, str]] = {}
    for label in labels:
        side = side_of(label)
        if side is None:
            continue
        name = label["name"]
        rest = name[len(side):] if name.lower().startswith(side) else name
        by_rest.setdefault(rest.lower(), {})[side] = name
    for sides in by_rest.values():
        if "right" in sides and "left" in sides:
            pairs.append({"right": sides["right"], "left": sides["left"]})
    return pairs


def case_statistics(label: sitk.Image, image: sitk.Image, preprocessing: dict, values: dict[str, int],
                    labelled: list[int] | None) -> dict[str, dict[str, Any]]:
    """Per contoured label of one training case: volume (ml), position in the body box, centre (LPS x),
    large components."""
    from scipy import ndimage

    from .preprocess import foreground_box

    crop = preprocessing.get("foreground_crop") or {}
    box = foreground_box(image, crop.get("threshold") if crop.get("enabled", True) else None,
                         float(crop.get("margin_mm", 10.0)))
    lo, hi = body_bounds(image, box)
    array = sitk.GetArrayViewFromImage(label)
    voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
    out: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if labelled is not None and value not in labelled:
            continue
        sl = ndimage.find_objects((array == value).astype(np.uint8))
        if not sl or sl[0] is None:
            out[name] = {"volume_ml": 0.0}
            continue
        region = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl[0])
        mask = array[region] == value
        kji = np.argwhere(mask).mean(axis=0) + [s.start for s in region]
        centre = np.array(label.TransformContinuousIndexToPhysicalPoint([float(kji[2]), float(kji[1]),
                                                                        float(kji[0])]))
        out[name] = {"volume_ml": float(mask.sum()) * voxel_ml, "centre_x": float(centre[0]),
                     "position": ((centre - lo) / np.maximum(hi - lo, 1e-6)).tolist(),
                     "components": large_component_count(mask)}
    return out


def summarise_statistics(per_case: list[dict[str, dict[str, Any]]], labels: list[dict[str, Any]],
                         sources: list[str]) -> dict[str, Any]:
    """The ``review`` metadata section from per-case statistics (``case_statistics``)."""
    pairs = declared_pairs(labels)
    paired = {n for p in pairs for n in (p["right"], p["left"])}
    section: dict[str, Any] = {"labels": {}, "left_right_pairs": pairs,
                               "source": {"datasets": sources, "cases": len(per_case),
                                          "flags": dict(FLAGS)}}
    for label in labels:
        name = label["name"]
        rows = [c[name] for c in per_case if name in c]
        present = [r for r in rows if r["volume_ml"] > 0]
        if not present:
            continue
        v = np.array([r["volume_ml"] for r in present])
        pos = np.array([r["position"] for r in present])
        comps = [r["components"] for r in present]
        section["labels"][name] = {
            "cases": len(rows), "present_fraction": round(len(present) / len(rows), 4),
            "volume_ml": {"min": round(float(v.min()), 2), "p01": round(float(np.percentile(v, 1)), 2),
                          "median": round(float(np.median(v)), 2),
                          "p99": round(float(np.percentile(v, 99)), 2), "max": round(float(v.max()), 2)},
            "position": {"min": pos.min(axis=0).round(4).tolist(), "max": pos.max(axis=0).round(4).tolist(),
                         "mean": pos.mean(axis=0).round(4).tolist()},
            "components_max": int(max(comps)),
        }
    # Left-right cues: organ pairs (neither in a declared left/right pair, whose labels follow the side
    # of the image) with a consistent left-right offset, and the threshold that ~2% of training trips.
    names = [label["name"] for label in labels if label["name"] not in paired]
    cue_pairs = []
    for a, b in combinations(names, 2):
        d = np.array([c[a]["centre_x"] - c[b]["centre_x"] for c in per_case
                      if "centre_x" in c.get(a, {}) and "centre_x" in c.get(b, {})])
        if d.size >= 10 and abs(d.mean()) >= 0.5 * d.std() > 0:
            cue_pairs.append({"labels": [a, b], "mean_mm": round(float(d.mean()), 2),
                              "sd_mm": round(float(d.std()), 2), "cases": int(d.size)})
    if cue_pairs:
        cues = {"pairs": cue_pairs}
        llrs = [lateral_llr({n: r["centre_x"] for n, r in c.items() if "centre_x" in r}, cues)
                for c in per_case]
        scored = np.array([x for x in llrs if x is not None])
        rate = 0.02
        section["lateral_cues"] = dict(cues, threshold=round(float(np.percentile(scored, 100 * rate)), 3),
                                       false_alarm_rate=rate)
    return section


def label_statistics(datasets: list[str], labels: list[dict[str, Any]], preprocessing: dict,
                     cases: set[str] | None = None, progress=None) -> dict[str, Any]:
    """The ``review`` metadata section from the training labels of nnU-Net ``datasets``.

    Only organs a case contoured count (``partial_labels``). ``cases``: restrict to these case names
    (the model's training cases), so validation patients stay unseen.
    """
    from .imageio import read_image
    from .train.dataset import load_dataset

    per_case = []
    names = [label["name"] for label in labels]
    for folder in datasets:
        dataset = load_dataset(folder)
        values = {n: dataset.labels[n] for n in names if n in dataset.labels}
        for case in dataset.cases:
            if cases is not None and case.name not in cases:
                continue
            image = read_image(case.images[0], "training image")
            per_case.append(case_statistics(sitk.ReadImage(str(case.label)), image, preprocessing,
                                            values, case.labelled))
            if progress:
                progress(case.name)
    return summarise_statistics(per_case, labels, [Path(d).name for d in datasets])


def add_statistics(model: str, datasets: list[str], all_cases: bool = False, progress=None) -> Path:
    """Record ``label_statistics`` of ``datasets`` in the package's metadata.json (``unetseg
    model-stats``); the weights, and so their checksum, stay as they are. Returns the metadata path.

    Only the model's training cases count when its metadata lists them (``all_cases``: every case).
    """
    import json

    from .errors import UNetSegError
    from .modelpkg import METADATA_FILE, get_model, validate_metadata
    from .outputs import atomic_write
    from .train.checks import check_dataset

    package = get_model(model)
    for folder in datasets:
        check_dataset(folder)
    train_cases = None if all_cases else package.meta.get("training", {}).get("train_cases")
    section = label_statistics(datasets, package.labels, package.meta["preprocessing"],
                               set(train_cases) if train_cases else None, progress)
    if not section["source"]["cases"]:
        raise UNetSegError(f"None of the model's {len(train_cases or [])} training cases is in "
                           f"{', '.join(datasets)}: give the datasets it was trained on, or --all-cases.")
    section["source"]["cases_used"] = "all" if not train_cases else "training cases of the model"
    meta = dict(package.meta, review=section)
    validate_metadata(meta)
    path = package.path / METADATA_FILE
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path
