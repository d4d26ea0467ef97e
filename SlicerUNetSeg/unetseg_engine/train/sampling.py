"""Class-balanced patch sampling for datasets where each case contoured only some organs.

Drawing a case uniformly and then a class would show an organ that 49 of 261 cases contoured (the
esophagus here) five times less often than one that all of them did. ``BalancedSampler`` draws the
class first, uniformly over the foreground classes plus "anywhere", then a case that contains that
class, then a voxel of it as the patch centre. The voxel lists are computed once per case, so a patch
costs a slice, not a search of the whole volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class BalancedSampler:
    def __init__(self, cases: list[dict[str, Any]], label_values: list[int], patch_zyx: list[int],
                 rng: np.random.Generator):
        self.cases, self.patch, self.rng = cases, np.array(patch_zyx), rng
        self.voxels: list[dict[int, np.ndarray]] = []
        for case in cases:
            flat = case["label"][0].ravel()
            order = np.argsort(flat, kind="stable")
            bounds = np.searchsorted(flat[order], [*label_values, max(label_values) + 1])
            self.voxels.append({v: order[bounds[i]:bounds[i + 1]].astype(np.int32)
                                for i, v in enumerate(label_values) if bounds[i + 1] > bounds[i]})
        self.cases_with = {v: [i for i, vox in enumerate(self.voxels) if v in vox] for v in label_values}
        self.classes = [v for v in label_values if self.cases_with[v]]

    def sample(self) -> dict[str, Any]:
        """One patch: ``image`` (C, *patch), ``label`` (1, *patch) and the case's other keys."""
        choice = self.rng.integers(len(self.classes) + 1)
        if choice == len(self.classes):  # anywhere, in any case
            index = int(self.rng.integers(len(self.cases)))
            shape = self.cases[index]["label"].shape[1:]
            centre = np.array([self.rng.integers(s) for s in shape])
        else:
            value = self.classes[choice]
            index = self.cases_with[value][self.rng.integers(len(self.cases_with[value]))]
            voxels = self.voxels[index][value]
            shape = self.cases[index]["label"].shape[1:]
            centre = np.array(np.unravel_index(int(voxels[self.rng.integers(voxels.size)]), shape))
        case = self.cases[index]
        image, label = crop(case["image"], case["label"], centre, self.patch)
        return {**case, "image": image, "label": label}


def crop(image: np.ndarray, label: np.ndarray, centre: np.ndarray, patch: np.ndarray):
    """The patch around ``centre``, kept inside the volume; a volume smaller than the patch is padded
    (image with its minimum, label with background)."""
    shape = np.array(label.shape[1:])
    pad = np.maximum(patch - shape, 0)
    if pad.any():
        widths = [(0, 0)] + [(int(p) // 2, int(p) - int(p) // 2) for p in pad]
        image = np.pad(image, widths, constant_values=float(image.min()))
        label = np.pad(label, widths, constant_values=0)
        centre, shape = centre + pad // 2, shape + pad
    start = np.clip(centre - patch // 2, 0, shape - patch)
    box = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch))
    return np.ascontiguousarray(image[(slice(None), *box)]), np.ascontiguousarray(label[(slice(None), *box)])
