"""The back-to-the-input-grid half of inference: class probabilities on the model grid to labels on
exactly the scan's own grid (uint8, or uint16 past 255 labels).

The probabilities come back by linear interpolation, only inside the box where some organ has a
probability above ``REGION_THRESHOLD`` (elsewhere background wins the argmax anyway, because linear
interpolation is a convex combination). So a 4 mm model gives smooth boundaries on a 0.8 mm scan
without a float copy of every class at full resolution. For the same reason, a voxel whose 8
surrounding model voxels share their most probable class takes that class without interpolating
anything; only voxels on organ boundaries are interpolated (``argmax_on``), a slab of slices at a
time, so an untrained network whose labels change every few voxels costs bounded memory; where most
of a slab is boundary on an axis-aligned grid (nnU-Net's always is), every class is interpolated by
three 1-D steps instead of point by point (``_argmax_separable``).

nnU-Net models hand over logits (``logits=True`` here): the region is where an organ wins, and a model
exported with a separate low-resolution axis is resampled nnU-Net's way (``nnunet.export_separate_z``).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import product
from typing import Any

import numpy as np
import SimpleITK as sitk

from .boxes import Box, box_reference, mask_extent
from .errors import CancelledError
from .modeldesc import ModelDescription
from .postprocess import clean_mask, postprocess_label_map
from .preprocess import Prepared
from .windows import CancelCallback, never_cancelled

REGION_THRESHOLD = 0.01
# Above this fraction of boundary voxels (a noisy, untrained network) ``argmax_on`` interpolates
# every class at every voxel instead, which then costs less.
MIXED_FRACTION_LIMIT = 0.15
# Boundary voxels are interpolated this many input voxels at a time (bounded memory).
SLAB_VOXELS = 1 << 21

Masks = dict[int, tuple[Box, np.ndarray]]  # label value -> (box, bool mask (k, j, i) in the box)


def labels_on_input_grid(probs: np.ndarray, prepared: Prepared, desc: ModelDescription, *,
                         postprocess: bool = True,
                         is_cancelled: CancelCallback = never_cancelled) -> tuple[sitk.Image, Masks | None]:
    """(label map on ``prepared.reference``'s grid, per-label masks for a multi-label model).

    ``probs``: (C, z, y, x) on ``prepared.grid``: probabilities (with background first for a
    multi-class model), or nnU-Net's logits for a model with an ``nnunet`` section.
    """
    reference = prepared.reference
    values = desc.label_values
    dtype = np.uint8 if max(values) < 256 else np.uint16
    size_kji = reference.GetSize()[::-1]
    label_map = np.zeros(size_kji, dtype)
    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    logits = desc.nnunet is not None
    masks: Masks | None = None
    if desc.multilabel:
        masks = {}
        best_score: np.ndarray | None = None  # float16 is plenty to rank overlapping labels
        for c, label in enumerate(desc.labels):
            if is_cancelled():
                raise CancelledError()
            box = region_box(probs, prepared, [c], logits)
            if box is None:
                masks[label.value] = (Box.empty(), np.zeros((0, 0, 0), bool))
                continue
            p = channel_on(probs, c, prepared.grid, box_reference(reference, box), 0.0)
            mask = p > desc.threshold
            if postprocess and label.postprocessing:
                mask = clean_mask(mask, label.postprocessing, voxel_mm3)
            masks[label.value] = (box, mask)
            if best_score is None:
                best_score = np.zeros(size_kji, np.float16)
            region, region_score = label_map[box.slices_kji()], best_score[box.slices_kji()]
            take = mask & (p > region_score)
            region[take] = label.value
            region_score[take] = p[take]
    else:
        box = region_box(probs, prepared, range(1, probs.shape[0]), logits)
        if box is not None:
            classes = _classes_on(probs, prepared, box_reference(reference, box), desc, is_cancelled)
            lut = np.array([0] + values, dtype)
            best_c = lut[classes]
            del classes
            if postprocess:
                postprocess_label_map(best_c, desc.labels, voxel_mm3)
            label_map[box.slices_kji()] = best_c
    image = sitk.GetImageFromArray(label_map)
    image.CopyInformation(reference)
    return image, masks


def region_box(probs: np.ndarray, prepared: Prepared, channels: Iterable[int],
               logits: bool = False) -> Box | None:
    """The input-index box covering model-grid voxels where any of ``channels`` is plausible
    (``logits``: where some organ wins the argmax), inside the crop box; None if there are none."""
    if logits:
        from .nnunet import foreground_mask

        mask = foreground_mask(probs)
    else:
        mask = np.zeros(probs.shape[1:], bool)
        for c in channels:
            mask |= probs[c] > REGION_THRESHOLD
    extent = mask_extent(mask)
    if extent is None:
        return None
    lo = [first - 1 for first in extent[0]]
    hi = [last + 1 for last in extent[1]]
    grid, reference = prepared.grid, prepared.reference
    indices = np.array([reference.TransformPhysicalPointToContinuousIndex(
        grid.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)]))
        for k, j, i in product(*[(a, b) for a, b in zip(lo, hi)])])
    size = np.array(reference.GetSize())
    start = np.clip(np.floor(indices.min(axis=0)).astype(int) - 1, 0, size)
    stop = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 2, 0, size)
    box_start = np.maximum(start, prepared.box.start)
    box_stop = np.minimum(stop, np.array(prepared.box.stop))
    if np.any(box_stop <= box_start):
        return None
    return Box.of(box_start, box_stop - box_start)


def channel_on(probs: np.ndarray, c: int, grid: sitk.Image, ref: sitk.Image, default: float) -> np.ndarray:
    """Channel ``c`` linearly interpolated onto ``ref``'s voxels (k, j, i), ``default`` outside."""
    image = sitk.GetImageFromArray(probs[c])
    image.CopyInformation(grid)
    resampled = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    # a copy: a view would dangle once ``resampled`` is freed at return
    return sitk.GetArrayFromImage(resampled)


def argmax_first_axis(stack: np.ndarray, dtype: Any) -> np.ndarray:
    """``np.argmax(stack, axis=0)`` (ties to the lower index), one contiguous pass per channel.

    Much faster than numpy's strided reduction over the first axis of a (C, ...) array.
    """
    best = stack[0].copy()
    index = np.zeros(best.shape, dtype)
    for c in range(1, stack.shape[0]):
        take = stack[c] > best
        np.copyto(best, stack[c], where=take)
        index[take] = c
    return index


def _axis_aligned(to_model: np.ndarray) -> list[int] | None:
    """For each input axis, the model axis it runs along, if the grids are axis-aligned (else None)."""
    axes = [int(np.argmax(np.abs(to_model[:, a]))) for a in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    off = np.abs(to_model).copy()
    for a, p in enumerate(axes):
        off[p, a] = 0.0
    return axes if off.max() <= 1e-9 * np.abs(to_model).max() else None


def _boundary_cells(top: np.ndarray, mixed: int) -> np.ndarray:
    """The argmax of each cell between 8 model voxels, or ``mixed`` where the 8 disagree.

    Edge-replicated, as the linear interpolator clamps at the border: cell (z, y, x) of the padded
    grid spans model indices [z - 1, z] x [y - 1, y] x [x - 1, x].
    """
    padded = np.pad(top, 1, mode="edge")
    cells = padded[:-1, :-1, :-1].copy()
    same = np.ones(cells.shape, bool)
    for dz, dy, dx in product((0, 1), repeat=3):
        if dz or dy or dx:
            same &= padded[dz:dz + cells.shape[0], dy:dy + cells.shape[1],
                           dx:dx + cells.shape[2]] == cells
    cells[~same] = mixed
    return cells


def argmax_on(probs: np.ndarray, prepared: Prepared, ref: sitk.Image,
              is_cancelled: CancelCallback = never_cancelled, logits: bool = False) -> np.ndarray:
    """The class index (k, j, i) of the largest linearly interpolated probability at ``ref``'s voxels.

    The same result as interpolating every class onto ``ref`` and taking the argmax (ties to the
    lower class), at a fraction of the cost: interpolation is a convex combination of the 8 model
    voxels around a point, so where those 8 share their argmax, the interpolated argmax is that
    class too. One nearest-neighbour resampling of the model grid's cells (uint8) labels all such
    voxels; only voxels in cells whose corners disagree (organ boundaries) are interpolated.
    """
    from scipy import ndimage

    n_classes = probs.shape[0]
    small = np.uint8 if n_classes < 255 else np.uint16
    mixed = n_classes  # marks cells whose 8 corners disagree
    cells = _boundary_cells(argmax_first_axis(probs, small), mixed)
    grid = prepared.grid
    # Input index (i, j, k) -> model continuous index (x, y, z): origin + to_model @ (i, j, k).
    to_physical = np.array(ref.GetDirection()).reshape(3, 3) * np.array(ref.GetSpacing())
    to_model = np.linalg.inv(np.array(grid.GetDirection()).reshape(3, 3) *
                             np.array(grid.GetSpacing())) @ to_physical
    origin = np.array(grid.TransformPhysicalPointToContinuousIndex(ref.GetOrigin()))
    axes = _axis_aligned(to_model)
    along: list[np.ndarray] = []
    if axes is not None:
        # Each input axis runs along one model axis: the cell of every voxel is a separable lookup
        # (nearest cell centre, as the nearest-neighbour resampling below would pick).
        size = ref.GetSize()
        along = [origin[axes[a]] + to_model[axes[a], a] * np.arange(size[a]) for a in range(3)]
        lookup: list[Any] = [None, None, None]  # per model axis x, y, z
        for a in range(3):
            p = axes[a]
            cell = np.clip(np.floor(along[a] + 1.0), 0, cells.shape[2 - p] - 1).astype(np.intp)
            lookup[p] = cell.reshape([-1 if d == 2 - a else 1 for d in range(3)])
        out = cells[lookup[2], lookup[1], lookup[0]]
    else:
        cell_image = sitk.GetImageFromArray(cells)
        cell_image.SetSpacing(grid.GetSpacing())
        cell_image.SetDirection(grid.GetDirection())
        cell_image.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
        pixel = sitk.sitkUInt8 if small is np.uint8 else sitk.sitkUInt16
        out = sitk.GetArrayFromImage(sitk.Resample(cell_image, ref, sitk.Transform(),
                                                   sitk.sitkNearestNeighbor, 0.0, pixel))
    del cells
    if is_cancelled():
        raise CancelledError()
    n_mixed = int(np.count_nonzero(out == mixed))
    # a noisy model: interpolate every class (not for nnU-Net's logits, which clamp at the edges)
    if n_mixed > MIXED_FRACTION_LIMIT * out.size and not logits:
        return _argmax_resampled(probs, prepared.grid, ref, is_cancelled, out)
    if n_mixed:
        # Slab by slab along the input's slice axis, so memory stays bounded however many voxels
        # are on boundaries (an untrained network's labels change every few voxels).
        shape_xyz = probs.shape[1:][::-1]
        step = max(1, SLAB_VOXELS // max(1, out.shape[1] * out.shape[2]))
        for k0 in range(0, out.shape[0], step):
            if is_cancelled():
                raise CancelledError()
            slab = out[k0:k0 + step]
            where = slab == mixed
            count = int(np.count_nonzero(where))
            if not count:
                continue
            if axes is not None and count > MIXED_FRACTION_LIMIT * slab.size:
                ks = slice(k0, k0 + slab.shape[0])
                dense = _argmax_separable(probs, axes, [along[0], along[1], along[2][ks]], small)
                slab[where] = dense[where]
                continue
            kji = list(np.nonzero(where))
            kji[0] += k0
            # Model-grid continuous indices of those voxels, clamped as the linear interpolator does.
            coords = []
            for p in (2, 1, 0):  # model z, y, x, as the (C, z, y, x) array is indexed
                if axes is not None:
                    a = axes.index(p)
                    c = along[a][kji[2 - a]]
                else:
                    row = to_model[p]
                    c = origin[p] + row[0] * kji[2] + row[1] * kji[1] + row[2] * kji[0]
                np.clip(c, 0, shape_xyz[p] - 1, out=c)
                coords.append(c)
            scores = np.empty((n_classes, count), np.float32)
            for channel in range(n_classes):
                ndimage.map_coordinates(probs[channel], coords, output=scores[channel], order=1,
                                        mode="nearest", prefilter=False)
            slab[where] = argmax_first_axis(scores, small)
    return out


def _lerp_along(values: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """``values`` linearly interpolated at continuous indices ``coords`` along ``axis``, clamped at
    the ends as ``map_coordinates(mode="nearest")`` does."""
    n = values.shape[axis]
    c = np.clip(coords, 0, n - 1)
    low = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    high = np.minimum(low + 1, n - 1)
    shape = [1, 1, 1]
    shape[axis] = -1
    w = (c - low).astype(np.float32).reshape(shape)
    a = np.take(values, low, axis=axis)
    b = np.take(values, high, axis=axis)
    b -= a
    b *= w
    a += b
    return a


def _argmax_separable(probs: np.ndarray, axes: list[int], along: list[np.ndarray], dtype: Any) -> np.ndarray:
    """Argmax over classes of every class linearly interpolated at the voxels of an axis-aligned
    input grid (``along[a]``: model continuous indices of input axis ``a``'s voxels), as three 1-D
    interpolations per class: the dense case of ``argmax_on``, for one slab at a time."""
    # output axis d (k, j, i) is input axis 2 - d, which runs along model axis axes[2 - d], which is
    # array axis 2 - axes[2 - d] of the (z, y, x) channel
    order = [2 - axes[2 - d] for d in range(3)]
    best: np.ndarray | None = None
    index: np.ndarray | None = None
    for c in range(probs.shape[0]):
        v = probs[c].transpose(order)
        for d in range(3):
            v = _lerp_along(v, d, along[2 - d])
        if best is None or index is None:
            best, index = v, np.zeros(v.shape, dtype)
        else:
            take = v > best
            np.copyto(best, v, where=take)
            index[take] = c
    assert index is not None
    return index


def _argmax_resampled(probs: np.ndarray, grid: sitk.Image, ref: sitk.Image, is_cancelled: CancelCallback,
                      out: np.ndarray) -> np.ndarray:
    """``argmax_on`` by resampling every class onto ``ref`` (into ``out``, reused)."""
    best_p = channel_on(probs, 0, grid, ref, 1.0)
    out[...] = 0
    for c in range(1, probs.shape[0]):
        if is_cancelled():
            raise CancelledError()
        p = channel_on(probs, c, grid, ref, 0.0)
        take = p > best_p
        best_p[take] = p[take]
        out[take] = c
    return out


def _classes_on(probs: np.ndarray, prepared: Prepared, ref: sitk.Image, desc: ModelDescription,
                is_cancelled: CancelCallback) -> np.ndarray:
    """``argmax_on``, or for nnU-Net models exported with a separate low-resolution axis, nnU-Net's
    own resampling of the logits (``nnunet.export_separate_z``)."""
    section = desc.nnunet
    if section is None:
        return argmax_on(probs, prepared, ref, is_cancelled)
    from . import nnunet

    if nnunet.needs_separate_z_export(prepared, section) is None:
        return argmax_on(probs, prepared, ref, is_cancelled, logits=True)
    classes = nnunet.export_separate_z(probs, prepared, section, is_cancelled)
    start = np.array(ref.GetOrigin())  # the region box, in the crop box's index space
    offset = np.rint(prepared.reference.TransformPhysicalPointToContinuousIndex(start)).astype(int)
    offset = offset - np.array(prepared.box.start)
    size = ref.GetSize()
    return classes[tuple(slice(o, o + n) for o, n in zip(offset[::-1], size[::-1]))]

