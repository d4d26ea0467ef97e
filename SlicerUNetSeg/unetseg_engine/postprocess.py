"""Per-label clean-up on the output grid: largest connected component, small islands, holes.

Each label is processed inside its own bounding box, so the cost follows the organ's size, not the
scan's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from .boxes import bounding_box
from .modeldesc import Label, Postprocessing

__all__ = ["bounding_box", "clean_mask", "postprocess_label_map"]

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected, as Slicer's islands effect


def clean_mask(mask: np.ndarray, rules: Postprocessing | Mapping[str, Any], voxel_mm3: float) -> np.ndarray:
    """Apply one label's rules to a boolean mask (returns a new array)."""
    rule = rules if isinstance(rules, Postprocessing) else Postprocessing.from_meta(rules)
    out = mask.copy()
    if rule.largest_component or rule.min_island_mm3:
        components, n = ndimage.label(out, structure=_CONNECTIVITY)
        if n > 1:
            sizes = np.bincount(components.ravel())[1:]
            keep = np.zeros(n + 1, bool)
            if rule.largest_component:
                keep[1 + int(np.argmax(sizes))] = True
            else:
                keep[1:] = True
            if rule.min_island_mm3:
                keep[1:] &= sizes * voxel_mm3 >= rule.min_island_mm3
            out = keep[components]
    if rule.fill_holes:
        out = ndimage.binary_fill_holes(out)
    return out


def postprocess_label_map(label_map: np.ndarray, labels: Iterable[Label], voxel_mm3: float) -> None:
    """Clean a (z, y, x) label map in place, label by label, each inside its bounding box.

    A voxel removed from a label becomes background; holes are filled only where they are background,
    so cleaning one organ never takes voxels from another.
    """
    for label in labels:
        if not label.postprocessing:
            continue
        value = label.value
        box = bounding_box(label_map == value)
        if box is None:
            continue
        region = label_map[box]
        mask = region == value
        cleaned = clean_mask(mask, label.postprocessing, voxel_mm3)
        region[mask & ~cleaned] = 0
        region[cleaned & (region == 0)] = value
