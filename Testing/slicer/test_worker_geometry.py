"""The geometry reaches the worker in one place: the header Slicer's own NRRD writer puts on the input
file (``geometry.writeVolumeForWorker``). On real MRML: an oblique volume with a flipped axis and
anisotropic voxels, under a linear transform, is written and read back by SimpleITK (the worker's
reader) with the node's own IJK-to-RAS, converted to LPS here, independently of the module's code."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from helpers import OBLIQUE_FLIPPED
from SlicerUNetSegLib.geometry import lpsGeometry, writeVolumeForWorker
from unetseg_engine.workerprotocol import InputVolume, parse_request

pytestmark = pytest.mark.slicer


def obliqueVolume(scene):
    voxels = np.random.default_rng(0).integers(-1000, 1000, (7, 9, 11)).astype(np.int16)  # (k, j, i)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    slicer.util.updateVolumeFromArray(node, voxels)
    spacing = np.array([0.7, 1.3, 3.1])
    ijkToRas = np.eye(4)
    # not round numbers: a header that rounded them would show
    ijkToRas[:3, :3] = OBLIQUE_FLIPPED * spacing
    ijkToRas[:3, 3] = [-101.234567, 42.7654321, 17.1234567]
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijkToRas[r, c])
    node.SetIJKToRASMatrix(matrix)
    # under a linear transform: the worker segments the volume's own (local) frame
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = vtk.vtkMatrix4x4()
    moved.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(moved)
    node.SetAndObserveTransformNodeID(transform.GetID())
    return node, voxels, spacing, ijkToRas


def test_the_input_file_header_carries_the_volumes_own_grid_in_lps(scene, tmp_path):
    node, voxels, spacing, ijkToRas = obliqueVolume(scene)
    record = writeVolumeForWorker(node, str(tmp_path / "input.nrrd"))
    # the record is the protocol's InputVolume: no geometry beside the header
    assert parse_request({"cmd": "segment", "id": "j", "inputs": [record], "output_dir": "o"}).inputs == [
        InputVolume(path=str(tmp_path / "input.nrrd"), name="oblique")]

    image = sitk.ReadImage(record["path"])
    rasToLps = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(image.GetSpacing(), spacing, rtol=1e-12, atol=0)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), rasToLps @ OBLIQUE_FLIPPED, atol=1e-12)
    assert np.allclose(image.GetOrigin(), rasToLps @ ijkToRas[:3, 3], atol=1e-9)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), voxels)  # (k, j, i), as arrayFromVolume
    # and the same numbers as the module's own conversion (learning.py uses it in Slicer's process)
    lpsSpacing, lpsOrigin, lpsDirection = lpsGeometry(node)
    assert np.allclose(image.GetSpacing(), lpsSpacing, rtol=1e-12)
    assert np.allclose(image.GetOrigin(), lpsOrigin, atol=1e-9)
    assert np.allclose(image.GetDirection(), lpsDirection, atol=1e-12)
