"""Volume nodes <-> (k, j, i) arrays with explicit LPS geometry, the contract of the engine boundary.

Slicer owns IJK-to-RAS. The engine wants SimpleITK's convention: spacing (i, j, k), origin and a
direction matrix whose columns are the i, j, k axes, all in LPS. RAS -> LPS negates x and y, so the
origin's first two numbers and the direction's first two rows change sign. Arrays are in
``slicer.util.arrayFromVolume`` order (k, j, i), which is also SimpleITK's array order.

Parent transforms: a volume under a *linear* transform is segmented in its own (local) coordinates,
which are the scanner's patient coordinates the model was trained on, and the segmentation is placed
under the same transform, so the two stay aligned. A *non-linear* transform is refused with a message
saying how to harden it: warping the voxels is the user's decision, not ours.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from unetseg_engine.errors import UNetSegError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def ijkToRasArray(volumeNode) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix (local coordinates, parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def lpsGeometry(volumeNode) -> tuple[list[float], list[float], list[float]]:
    """(spacing ijk, origin LPS, direction LPS as 9 numbers row-major) of a volume node."""
    spacing = np.array(volumeNode.GetSpacing(), float)
    ijkToRas = ijkToRasArray(volumeNode)
    directionRas = ijkToRas[:3, :3] / spacing  # columns: unit i, j, k axes in RAS
    directionLps = RAS_TO_LPS @ directionRas
    originLps = RAS_TO_LPS @ ijkToRas[:3, 3]
    return spacing.tolist(), originLps.tolist(), directionLps.ravel().tolist()


def checkVolume(volumeNode, what: str = "input volume"):
    """Refuse what the engine cannot use; returns the linear parent transform node (or None)."""
    if volumeNode is None:
        raise UNetSegError(f"No {what} is selected. Load a scan and select it as the input volume.")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise UNetSegError(f"'{volumeNode.GetName()}' is not a scalar (grey-level) volume; select a CT "
                           "or MR scan as the input volume.")
    image = volumeNode.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise UNetSegError(f"The {what} '{volumeNode.GetName()}' has no voxels; load the scan again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise UNetSegError(f"The {what} '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()}"
                           " components per voxel (a colour or vector image); give a single-channel scan.")
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is not None and not transformNode.IsTransformToWorldLinear():
        raise UNetSegError(
            f"The {what} '{volumeNode.GetName()}' is under the non-linear transform "
            f"'{transformNode.GetName()}'. Harden the transform first (Data module: right-click the "
            "volume > Harden transform) or remove it, then segment again.")
    return transformNode


def writeVolumeForWorker(volumeNode, path: str) -> dict[str, str]:
    """Write the voxels as an uncompressed .nrrd and return the worker's input record
    (``workerprotocol.InputVolume``: path and name).

    Slicer's own NRRD writer writes the node's image data as it is (no copy of the voxels is made) and
    its local IJK-to-RAS as LPS space directions and origin (the same numbers ``lpsGeometry`` gives):
    that header is the one place the geometry travels to the worker, so voxels and grid cannot part.
    The user's volume is only read.
    """
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()  # not added to the scene
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(volumeNode):
        raise UNetSegError(f"Could not write the input volume '{volumeNode.GetName()}' to '{path}' for "
                           "the engine (is the temporary folder full?).")
    return {"path": str(path), "name": volumeNode.GetName()}


def loadVolumeFile(path: str, name: str | None = None, labelmap: bool = False, scene=None):
    """Read a volume file into a new node through a storage node (works with and without the Slicer
    application; ``slicer.util.loadVolume`` needs the application's IO manager)."""
    scene = scene or slicer.mrmlScene
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name or "")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(False)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise UNetSegError(f"Could not read the volume file '{path}'.")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node
