"""Boxes of voxels: the one place that finds where a mask is and describes a sub-grid of an image.

Array boxes are in numpy's (k, j, i) order, as ``sitk.GetArrayFromImage`` gives; ``Box`` is in ITK's
(i, j, k) index order, as ``Image.TransformIndexToPhysicalPoint`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


def _ijk(values) -> tuple[int, int, int]:
    i, j, k = (int(v) for v in values)
    return i, j, k


@dataclass(frozen=True)
class Box:
    """A box of voxels of an image: start index and size, both (i, j, k)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @classmethod
    def of(cls, start, size) -> Box:
        """From any three-number sequences (numpy arrays included)."""
        return cls(_ijk(start), _ijk(size))

    @classmethod
    def from_slices_kji(cls, slices: tuple[slice, ...]) -> Box:
        """The box of array slices (k, j, i), as ``bounding_box`` gives."""
        return cls(_ijk(s.start for s in slices[::-1]), _ijk(s.stop - s.start for s in slices[::-1]))

    @classmethod
    def empty(cls) -> Box:
        return cls((0, 0, 0), (0, 0, 0))

    @property
    def stop(self) -> tuple[int, int, int]:
        return _ijk(s + n for s, n in zip(self.start, self.size))

    def slices_kji(self) -> tuple[slice, slice, slice]:
        k, j, i = (slice(s, s + n) for s, n in zip(self.start[::-1], self.size[::-1]))
        return k, j, i


def mask_extent(mask: np.ndarray) -> tuple[list[int], list[int]] | None:
    """Per array axis, the first and last index holding a True voxel (None if there is none)."""
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(mask.ndim):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]))
    return lo, hi


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Array slices around the True voxels of ``mask``, ``margin`` voxels wider (None if it is empty)."""
    extent = mask_extent(mask)
    if extent is None:
        return None
    return tuple(slice(max(0, lo - margin), min(n, hi + 1 + margin))
                 for lo, hi, n in zip(*extent, mask.shape))


def box_reference(image: sitk.Image, box: Box) -> sitk.Image:
    """An empty image with the geometry of ``box`` inside ``image`` (same spacing and direction)."""
    ref = sitk.Image(list(box.size), sitk.sitkUInt8)
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(s) for s in box.start]))
    return ref
