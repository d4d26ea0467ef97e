"""Per-label clean-up on the output grid: largest connected component, small islands, holes.

Each label is processed inside its own bounding box, so the cost follows the organ's size, not the
scan's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected, as Slicer's islands effect


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices around the True voxels of ``mask`` (None if it is empty)."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, nz[0] - margin), min(mask.shape[axis], nz[-1] + 1 + margin)))
    return tuple(box)


def clean_mask(mask: np.ndarray, rules: dict[str, Any], voxel_mm3: float) -> np.ndarray:
    """Apply one label's rules to a boolean mask (returns a new array)."""
    out = mask.copy()
    if rules.get("largest_component") or rules.get("min_island_mm3"):
        components, n = ndimage.label(out, structure=_CONNECTIVITY)
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            keep = np.zeros(n + 1, bool)
            if rules.get("largest_component"):
                keep[1 + int(np.argmax(sizes))] = True
            else:
                keep[1:] = True
            if rules.get("min_island_mm3"):
                keep[1:] &= sizes * voxel_mm3 >= float(rules["min_island_mm3"])
            out = keep[components]
    if rules.get("fill_holes"):
        out = ndimage.binary_fill_holes(out)
    return out


def postprocess_label_map(label_map: np.ndarray, labels: list[dict[str, Any]], voxel_mm3: float) -> None:
    """Clean a (z, y, x) label map in place, label by label, each inside its bounding box.

    A voxel removed from a label becomes background; holes are filled only where they are background,
    so cleaning one organ never takes voxels from another.
    """
    for label in labels:
        rules = label.get("postprocessing") or {}
        if not rules:
            continue
        value = label["value"]
        box = bounding_box(label_map == value)
        if box is None:
            continue
        region = label_map[box]
        mask = region == value
        cleaned = clean_mask(mask, rules, voxel_mm3)
        region[mask & ~cleaned] = 0
        region[cleaned & (region == 0)] = value
