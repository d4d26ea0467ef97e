"""The MONAI reference pipeline that ``unetseg benchmark`` compares our engine with.

This is the pipeline a MONAI user would write for a trained model, with the model's own settings:

    LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> ScaleIntensityRanged
    -> sliding_window_inference (overlap 0.5, Gaussian blending) -> Invertd -> AsDiscreted(argmax)

Geometry: MONAI loads arrays in ITK index order (x, y, z) with a RAS affine. Our model grid is axis-
aligned with identity direction in LPS (i -> L, j -> P, k -> S), which is MONAI's axcodes "LPS"; the
model's ``patch_size`` is (x, y, z), the order of MONAI's spatial dims, so it is the ROI as it is.
The package's networks were trained on (z, y, x) arrays (SimpleITK/numpy order), so each window is
transposed to (z, y, x) for the network and its output back to (x, y, z): without that, the network
would see every patch with x and z swapped.
Each transform is applied in turn (exactly what ``Compose`` does) so its time can be reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk


def _timed(stages: dict[str, float], name: str, func, *args, **kwargs):
    t = time.perf_counter()
    out = func(*args, **kwargs)
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
    return out


class ReferencePipeline:
    """MONAI's pipeline for one model package; ``run`` maps an image file to labels on its grid."""

    def __init__(self, package, device: str = "cpu") -> None:
        from monai.transforms import (
            AsDiscreted,
            Compose,
            EnsureChannelFirstd,
            Invertd,
            LoadImaged,
            Orientationd,
            ScaleIntensityRanged,
            Spacingd,
        )

        meta = package.meta
        if package.multilabel:
            raise ValueError("the MONAI reference pipeline (argmax) is for multiclass models")
        if len(meta["inputs"]) != 1:
            raise ValueError("the MONAI reference pipeline takes single-input models")
        norm = meta["preprocessing"]["normalization"]
        if norm.get("method") != "ct_window":
            raise ValueError("the MONAI reference pipeline uses the model's CT window")
        level, width = float(norm["level"]), float(norm["width"])
        self.package = package
        self.device = device
        self.pre = Compose([
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys="image", pixdim=tuple(meta["preprocessing"]["spacing_mm"]), mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=level - width / 2, a_max=level + width / 2,
                                 b_min=0.0, b_max=1.0, clip=True),
        ])
        self.invert = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False,
                              to_tensor=True)
        self.argmax = AsDiscreted(keys="pred", argmax=True)
        self.pre_names = ["load_image", "ensure_channel_first", "orientation", "spacing",
                          "scale_intensity"]
        inference = meta["inference"]
        self.roi_size = tuple(int(v) for v in inference["patch_size"])  # (x, y, z) = MONAI's order
        self.sw_batch_size = int(inference.get("sw_batch_size", 2))
        self.network: Callable[[Any], Any] | None = None

    def load(self) -> None:
        """Build the network and load the package's weights (what a MONAI user does)."""
        import torch

        from .networks import build_network, volume_network

        net = self.package.meta["network"]
        if net["spatial_dims"] != 3:  # MONAI's windows are (x, y, z); a 2D model runs on (x, y, 1)
            raise ValueError("the MONAI reference pipeline takes 3D models")
        members = []
        for weights in self.package.weight_files:
            core = build_network(net["architecture"], net["spatial_dims"], 1,
                                 self.package.out_channels, net["params"])
            core.load_state_dict(torch.load(self.package.path / weights["file"], map_location="cpu",
                                            weights_only=True))
            members.append(volume_network(core, 3).eval().to(self.device))

        def zyx_network(x):  # MONAI's (B, C, x, y, z) windows -> the network's (B, C, z, y, x)
            x = x.permute(0, 1, 4, 3, 2)
            if len(members) == 1:
                out = members[0](x)
            else:  # an ensemble: the mean of the members' class probabilities
                out = sum(torch.softmax(member(x), dim=1) for member in members) / len(members)
            return out.permute(0, 1, 4, 3, 2)

        self.network = zyx_network

    def run(self, path: str, stages: dict[str, float]) -> sitk.Image:
        """Segment the image file at ``path``; returns the label map (model label values) on its grid."""
        import torch
        from monai.inferers import sliding_window_inference

        if self.network is None:
            _timed(stages, "load_model", self.load)
        data: dict[str, Any] = {"image": path}
        for name, transform in zip(self.pre_names, self.pre.transforms):
            data = _timed(stages, name, transform, data)

        def infer():
            with torch.no_grad():
                x = data["image"][None].to(self.device)
                return sliding_window_inference(x, self.roi_size, self.sw_batch_size, self.network,
                                                overlap=0.5, mode="gaussian")[0]

        data["pred"] = _timed(stages, "sliding_window", infer)
        if self.device == "cuda":
            torch.cuda.synchronize()
        data = _timed(stages, "invert", self.invert, data)
        data = _timed(stages, "argmax", self.argmax, data)
        return _timed(stages, "to_label_map", self._label_map, data["pred"])

    def _label_map(self, pred) -> sitk.Image:
        """The (1, x, y, z) class-index MetaTensor as a SimpleITK label map in LPS, model values."""
        values = np.array([0] + [label["value"] for label in self.package.labels])
        dtype = np.uint8 if values.max() < 256 else np.uint16
        index = pred[0].detach().cpu().numpy().astype(np.int64)
        labels = values.astype(dtype)[index]
        image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
        affine = np.asarray(pred.affine, dtype=float).copy()
        affine[:2] *= -1  # RAS -> LPS
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        image.SetSpacing([float(s) for s in spacing])
        image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
        image.SetOrigin([float(v) for v in affine[:3, 3]])
        return image
