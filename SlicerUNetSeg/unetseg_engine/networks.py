"""Build U-Net family networks from MONAI's classes, from plain validated parameters.

A model package names an architecture and gives its keyword arguments as JSON. Only the architectures
and argument names listed here are accepted, and every value must be a JSON number, string, boolean or
list of those: nothing from a model's files is evaluated as code.
"""

from __future__ import annotations

from typing import Any

from .errors import UNetSegError

# Architecture name -> (MONAI class path, accepted keyword arguments besides the channel counts).
ARCHITECTURES: dict[str, tuple[str, set[str]]] = {
    "UNet": (
        "monai.networks.nets.UNet",
        {"channels", "strides", "kernel_size", "up_kernel_size", "num_res_units", "act", "norm",
         "dropout", "bias", "adn_ordering"},
    ),
    "BasicUNet": ("monai.networks.nets.BasicUNet", {"features", "act", "norm", "bias", "dropout",
                                                     "upsample"}),
    "BasicUNetPlusPlus": ("monai.networks.nets.BasicUNetPlusPlus",
                          {"features", "deep_supervision", "act", "norm", "bias", "dropout",
                           "upsample"}),
    "AttentionUnet": ("monai.networks.nets.AttentionUnet",
                      {"channels", "strides", "kernel_size", "up_kernel_size", "dropout"}),
    "VNet": ("monai.networks.nets.VNet", {"act", "dropout_prob", "dropout_dim", "bias"}),
    "DynUNet": ("monai.networks.nets.DynUNet",
                {"kernel_size", "strides", "upsample_kernel_size", "filters", "dropout", "norm_name",
                 "act_name", "deep_supervision", "deep_supr_num", "res_block", "trans_bias"}),
    "SegResNet": ("monai.networks.nets.SegResNet",
                  {"init_filters", "dropout_prob", "act", "norm", "num_groups", "use_conv_final",
                   "blocks_down", "blocks_up", "upsample_mode"}),
}

_JSON_SCALARS = (int, float, str, bool, type(None))


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, _JSON_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(name, item)
        return
    if isinstance(value, dict):  # e.g. MONAI's ("instance", {"affine": True}) written as a pair
        for key, item in value.items():
            if not isinstance(key, str):
                raise UNetSegError(f"Network parameter '{name}' has a non-string key {key!r}.")
            _check_value(name, item)
        return
    raise UNetSegError(f"Network parameter '{name}' has an unsupported value type {type(value)}.")


def _as_monai_arg(value: Any) -> Any:
    """JSON lists become tuples; ["instance", {...}] pairs stay (name, kwargs) as MONAI expects."""
    if isinstance(value, list):
        return tuple(_as_monai_arg(v) for v in value)
    return value


def validate_network(architecture: str, spatial_dims: int, params: dict[str, Any]) -> None:
    """Raise UNetSegError unless the architecture and its parameters are on the allow-list."""
    if architecture not in ARCHITECTURES:
        raise UNetSegError(
            f"Unknown network architecture '{architecture}'. Supported: {', '.join(ARCHITECTURES)}.")
    if spatial_dims not in (2, 3):
        raise UNetSegError(f"spatial_dims must be 2 or 3, not {spatial_dims}.")
    if architecture == "VNet" and spatial_dims != 3:
        raise UNetSegError("VNet is a 3D network; use spatial_dims 3.")
    allowed = ARCHITECTURES[architecture][1]
    for name, value in params.items():
        if name not in allowed:
            raise UNetSegError(
                f"Parameter '{name}' is not accepted for {architecture}. Accepted: {sorted(allowed)}.")
        _check_value(name, value)


def _stride_product(strides: list, spatial_dims: int) -> list[int]:
    """Per-axis product of a list of strides (each an int or one value per axis, tensor order)."""
    factor = [1] * spatial_dims
    for stride in strides:
        per_axis = stride if isinstance(stride, (list, tuple)) else [stride] * spatial_dims
        factor = [f * int(s) for f, s in zip(factor, per_axis)]
    return factor


def downsampling_factors(architecture: str, spatial_dims: int, params: dict[str, Any]) -> list[int]:
    """How much the network shrinks each axis at its bottom, in tensor order (z, y, x) or (y, x).

    A window whose size is not a multiple of this breaks the skip connections (a shape mismatch deep
    inside MONAI), so model packages are checked against it before anything runs.
    """
    if architecture in ("UNet", "AttentionUnet"):
        return _stride_product(params.get("strides", [2, 2, 2]), spatial_dims)
    if architecture == "DynUNet":
        return _stride_product(params.get("strides", [1, 2, 2, 2, 2]), spatial_dims)
    if architecture == "SegResNet":
        return [2 ** (len(params.get("blocks_down", [1, 2, 2, 4])) - 1)] * spatial_dims
    return [16] * spatial_dims  # BasicUNet, BasicUNetPlusPlus and VNet pool four times by 2


def check_patch_fits(architecture: str, spatial_dims: int, params: dict[str, Any],
                     patch_xyz: list[int]) -> None:
    """Raise UNetSegError unless sliding windows of ``patch_xyz`` (x, y, z) can pass the network."""
    if spatial_dims == 2 and patch_xyz[2] != 1:
        raise UNetSegError(f"A 2D network runs on single slices: patch_size must end in 1, not "
                           f"{patch_xyz}.")
    factors_xyz = downsampling_factors(architecture, spatial_dims, params)[::-1] + [1] * (3 - spatial_dims)
    if any(size % factor for size, factor in zip(patch_xyz, factors_xyz)):
        raise UNetSegError(f"patch_size {patch_xyz} (x, y, z) does not fit the {architecture} network, "
                           f"which downsamples by {factors_xyz}: each window axis must be a multiple "
                           "of that.")


def build_network(architecture: str, spatial_dims: int, in_channels: int, out_channels: int,
                  params: dict[str, Any] | None = None):
    """Instantiate a MONAI network (imports torch and monai)."""
    import importlib

    params = dict(params or {})
    validate_network(architecture, spatial_dims, params)
    module_name, class_name = ARCHITECTURES[architecture][0].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = {k: _as_monai_arg(v) for k, v in params.items()}
    if architecture == "AttentionUnet":
        kwargs.setdefault("channels", (16, 32, 64, 128))
        kwargs.setdefault("strides", (2, 2, 2))
    if architecture == "DynUNet":
        kwargs.setdefault("kernel_size", [[3] * spatial_dims] * 5)
        kwargs.setdefault("strides", [[1] * spatial_dims] + [[2] * spatial_dims] * 4)
        kwargs.setdefault("upsample_kernel_size", kwargs["strides"][1:])
    if architecture == "SegResNet":
        return cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                   **kwargs)
    if architecture == "VNet":
        return cls(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **kwargs)
    return cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)


def main_output(output):
    """The full-resolution output of networks that return several heads.

    BasicUNetPlusPlus returns a list whose last item is the deepest decoder's output; DynUNet with
    deep supervision returns (B, heads, C, z, y, x) in training mode, the main head first.
    """
    if isinstance(output, (list, tuple)):
        return output[-1]
    if output.dim() == 6:
        return output[:, 0]
    return output


def volume_network(network, spatial_dims: int):
    """Make any network take (B, C, z, y, x): a 2D network then runs on slices of depth one.

    Sliding-window inference and training both use (1, y, x) windows for 2D models, so a 2D model
    runs slice by slice, with ``sw_batch_size`` slices in a batch.
    """
    import torch

    if spatial_dims == 3:
        return network

    class SliceWise(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            b, c, d, h, w = x.shape
            flat = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
            out = main_output(self.net(flat))
            return out.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)

    return SliceWise(network)


def channels_last_instance_norm(network) -> int:
    """Swap each InstanceNorm layer for the same computation done by ``group_norm`` (one group per
    channel); returns how many were swapped. For inference on the CPU in channels-last layout.

    PyTorch's instance norm copies a channels-last tensor to channels-first and back on every call
    (a quarter of the network's time here); its group norm has a channels-last CPU kernel. The
    result is the same up to float rounding (outputs checked against the original network in
    ``Testing/test_predictor.py``). Layers with running statistics are left alone.
    """
    import torch
    import torch.nn.functional as F

    class InstanceNormAsGroupNorm(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.num_features, self.eps = norm.num_features, norm.eps
            self.weight, self.bias = norm.weight, norm.bias

        def forward(self, x):
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)

    norms = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
    swapped = 0
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, norms) and not child.track_running_stats:
                setattr(module, name, InstanceNormAsGroupNorm(child))
                swapped += 1
    return swapped
