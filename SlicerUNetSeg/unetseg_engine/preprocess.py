"""From a scan to the network's input: foreground box, model grid, intensity normalisation.

The model grid is axis-aligned in LPS (identity direction) at the model's spacing, and covers only the
foreground box of the scan. Reorientation, cropping and resampling are one ``sitk.Resample`` call, so
the scan is interpolated once. Training prepares its cases with the same functions, so a model sees
the same geometry and intensities in training and in use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
import SimpleITK as sitk

from .boxes import Box, box_reference, mask_extent
from .errors import UNetSegError
from .modeldesc import Normalization
from .modeldesc import Preprocessing as PreprocessingSpec

__all__ = ["Box", "Prepared", "background_value", "box_reference", "foreground_box", "model_grid",
           "normalize", "prepare", "resample_to"]

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def foreground_box(image: sitk.Image, threshold: float | None, margin_mm: float = 10.0) -> Box:
    """The box (in the image's own index space) around voxels above ``threshold``, plus a margin.

    ``threshold=None`` means the whole image. Works on a strided view, so it costs little on a
    512 x 512 x 600 scan; the margin covers the stride.
    """
    size = image.GetSize()
    whole = Box.of((0, 0, 0), size)
    if threshold is None:
        return whole
    view = sitk.GetArrayViewFromImage(image)
    stride = 2 if view.size > 4_000_000 else 1
    extent = mask_extent(view[::stride, ::stride, ::stride] > threshold)
    if extent is None:
        return whole
    lo = [first * stride for first in extent[0]]
    hi = [min(last * stride + stride, view.shape[axis]) for axis, last in enumerate(extent[1])]
    spacing = image.GetSpacing()
    start, box_size = [], []
    for axis_ijk in range(3):
        a = 2 - axis_ijk
        margin = int(np.ceil(margin_mm / spacing[axis_ijk])) + stride
        s = max(0, lo[a] - margin)
        e = min(size[axis_ijk], hi[a] + margin)
        start.append(s)
        box_size.append(e - s)
    return Box.of(start, box_size)


def model_grid(image: sitk.Image, box: Box, spacing_xyz: tuple[float, ...],
               min_size_xyz: tuple[int, ...] | None = None) -> sitk.Image:
    """An empty, axis-aligned (identity direction) grid at ``spacing_xyz`` covering ``box`` of ``image``.

    ``min_size_xyz`` pads the grid symmetrically so it is at least one patch large.
    """
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                        for c in product(*[(s - 0.5, s + n - 0.5) for s, n in zip(box.start, box.size)])])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    spacing = np.asarray(spacing_xyz, dtype=float)
    size = np.maximum(np.ceil((hi - lo) / spacing - 1e-6).astype(int), 1)
    if min_size_xyz is not None:
        size = np.maximum(size, np.asarray(min_size_xyz, dtype=int))
    center = (lo + hi) / 2.0
    origin = center - (size - 1) * spacing / 2.0
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(IDENTITY)
    return grid


def resample_to(image: sitk.Image, reference: sitk.Image, *, nearest: bool = False,
                default: float = 0.0, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (linear, or nearest for label maps)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default), pixel_type)


def normalize(array: np.ndarray, spec: Normalization | Mapping[str, Any],
              window: tuple[float, float] | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale intensities as the model says; returns float32 (the input is not modified).

    - ``ct_window``: clip to [level - width/2, level + width/2], then scale to [0, 1]. ``window``
      (level, width) overrides the model's window for this call only.
    - ``zscore``: subtract the mean and divide by the standard deviation (inside ``mask`` if given).
    - ``percentile``: clip to the given percentiles, then scale to [0, 1].
    """
    norm = spec if isinstance(spec, Normalization) else Normalization.from_meta(spec)
    method = norm.method
    x = np.asarray(array, dtype=np.float32)
    if method == "ct_window":
        chosen = window if window is not None else norm.window
        if chosen is None:
            raise UNetSegError("A ct_window normalisation needs a level and a width.")
        level, width = chosen
        if width <= 0:
            raise UNetSegError(f"The intensity window width must be positive (got {width}).")
        lower = level - width / 2.0
        out = np.clip(x, lower, lower + width)
        out -= np.float32(lower)
        out *= np.float32(1.0 / width)
        return out
    values = x[mask] if mask is not None and mask.any() else x
    if method == "zscore":
        mean, std = float(values.mean()), float(values.std())
        return (x - np.float32(mean)) / np.float32(max(std, 1e-6))
    if method == "percentile":
        lo, hi = np.percentile(values, [norm.lower, norm.upper])
        out = (x - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-6))
        return np.clip(out, 0.0, 1.0, out=out)
    raise UNetSegError(f"Unknown normalisation method '{method}'.")


def background_value(spec: Normalization | Mapping[str, Any], image: sitk.Image) -> float:
    """The value used outside the scan when resampling: air for CT, the minimum otherwise."""
    method = spec.method if isinstance(spec, Normalization) else spec.get("method")
    if method == "ct_window":
        return -1024.0
    return float(sitk.GetArrayViewFromImage(image).min())


@dataclass
class Prepared:
    """The network input for one scan, and what is needed to map results back to it."""

    array: np.ndarray  # (channels, z, y, x) float32, normalised, on the model grid
    grid: sitk.Image  # the model grid (empty image carrying its geometry)
    box: Box  # the foreground box in the first input's index space
    reference: sitk.Image  # the first input image (geometry of the output)


def prepare(images: list[sitk.Image], preprocessing: PreprocessingSpec | Mapping[str, Any],
            window: tuple[float, float] | None = None) -> Prepared:
    """Crop to the foreground, resample every channel once onto the model grid, normalise.

    ``preprocessing``: the model's (``package.desc.preprocessing``; its metadata section also works).
    """
    if not images:
        raise UNetSegError("No input volume was given.")
    spec = preprocessing if isinstance(preprocessing, PreprocessingSpec) else \
        PreprocessingSpec.from_meta(preprocessing)
    first = images[0]
    crop = spec.foreground_crop
    box = foreground_box(first, crop.box_threshold, crop.margin_mm)
    grid = model_grid(first, box, spec.spacing_mm)
    norm = spec.normalization
    channels = []
    for image in images:
        resampled = resample_to(image, grid, default=background_value(norm, image))
        arr = sitk.GetArrayFromImage(resampled)
        mask = arr > crop.threshold if crop.threshold is not None else None
        channels.append(normalize(arr, norm, window, mask))
    return Prepared(np.stack(channels), grid, box, first)
