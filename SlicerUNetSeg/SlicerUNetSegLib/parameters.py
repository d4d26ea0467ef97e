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
DEVICES = ("auto", "cuda", "cpu")


@parameterNodeWrapper
class SlicerUNetSegParameterNode:
    """inputVolume..inputVolume4: one per model input channel, in the model's order.
    outputSegmentation: None means "create a new segmentation".
    overrideWindow/windowLevel/windowWidth: the preprocessing window (never the volume's voxels).
    device: "auto", "cuda" or "cpu".
    runtime: what runs the network on the CPU: "auto" (the fastest installed), "torch", "openvino"
    or "onnxruntime"."""

    inputVolume: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    inputVolume4: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    overrideWindow: bool = False
    # the ranges go on the spin boxes (connectGui replaces the .ui's range with these, or -inf..inf)
    windowLevel: Annotated[float, WithinRange(-3000.0, 3000.0)] = 40.0
    windowWidth: Annotated[float, WithinRange(1.0, 8000.0)] = 400.0
    device: str = "auto"
    runtime: str = "auto"

