"""Slicer-side helpers of the SlicerUNetSeg module: volume <-> array with geometry, segmentation
building, the background inference runner, dependency installation, and the module logic.

Everything here imports ``slicer`` and ``vtk`` but never ``qt``, so the logic runs headless (Slicer's
Python console, scripts, ``PythonSlicer``, and the slicer-core wheel in tests).
"""
