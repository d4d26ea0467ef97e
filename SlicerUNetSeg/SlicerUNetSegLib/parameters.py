"""The module's parameter node: every panel setting, saved with the scene.

Widgets in ``Resources/UI/SlicerUNetSeg.ui`` bind to these names through their ``SlicerParameterName``
dynamic property (``connectGui``); the model, device and runtime combo boxes are synchronised by the
widget because their items are filled at run time.
"""

from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

MAX_INPUTS = 4
INPUT_PARAMETERS = ("inputVolume", "inputVolume2", "inputVolume3", "inputVolume4")
# Slicer's WithinRange raises ValueError outside these, so a model's window is clamped to them
# (clampWindow) before it is written; the model schema bounds a package's window the same way.
WINDOW_LEVEL_RANGE = (-3000.0, 3000.0)
WINDOW_WIDTH_RANGE = (1.0, 8000.0)


def clampWindow(level: float, width: float) -> tuple[float, float]:
    """(level, width) moved into the ranges the parameter node accepts."""
    return (min(max(float(level), WINDOW_LEVEL_RANGE[0]), WINDOW_LEVEL_RANGE[1]),
            min(max(float(width), WINDOW_WIDTH_RANGE[0]), WINDOW_WIDTH_RANGE[1]))


@parameterNodeWrapper
class SlicerUNetSegParameterNode:
    """inputVolume..inputVolume4: one per model input channel, in the model's order.
    outputSegmentation: None means "create a new segmentation".
    overrideWindow/windowLevel/windowWidth: the preprocessing window (never the volume's voxels).
    device: "auto", "cuda" or "cpu".
    runtime: what runs the network on the CPU: "auto" (the fastest installed), "torch", "openvino",
    "onnxruntime", "openvino-int8" (the model's int8 graph, when it has one) or "openvino-bf16"
    (OpenVINO at bfloat16, on CPUs with native bfloat16)."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    overrideWindow: bool = False
    # the ranges go on the spin boxes (connectGui replaces the .ui's range with these, or -inf..inf)
    windowLevel: Annotated[float, WithinRange(*WINDOW_LEVEL_RANGE)] = 40.0
    windowWidth: Annotated[float, WithinRange(*WINDOW_WIDTH_RANGE)] = 400.0
    device: str = "auto"
    runtime: str = "auto"

