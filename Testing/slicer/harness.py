"""Slicer's own Python code, on the real MRML of slicer-core, with stand-ins only for the application.

Real (read, unmodified, from ``$UNETSEG_SHARED/slicer-python/v5.10.0``, default ``../shared`` next to
the repository; see its README): ``slicer.ScriptedLoadableModule`` (module, widget, logic and test base
classes), ``slicer.parameterNodeWrapper`` (typed parameters, validators such as ``WithinRange``, the
serializers and the GUI connectors), ``slicer.i18n`` and ``slicer.testing``. They are loaded from
there as ``slicer.<name>``; nothing is copied into the repository.

Also real: the MRML scene and module logics (slicer-core), ``slicer.util``, VTK, and Qt (PySide6,
offscreen; see ``qtHarness``).

Stand-ins, for what only the application provides (``qSlicerApplication`` and its C++ widgets):

- ``slicer.mrmlScene``: a ``vtkMRMLScene`` with the real Colors, Segmentations and Subject Hierarchy
  logics attached (as the application does for every scene);
- ``slicer.app``: ``processEvents`` (the Qt event pump), ``translate`` (Qt's
  ``QCoreApplication.translate``, which is what qSlicerApplication inherits), ``moduleManager()``
  (accepts the widget's ``moduleAboutToBeUnloaded`` connection) and ``applicationLogic()``;
- ``slicer.modules``: ``segmentations.logic()``, ``subjecthierarchy.logic()``, ``volumes.logic()``, and
  ``slicerunetseg``
  with the module's ``path`` (what ``slicer.util.modulePath`` reads);
- the Qt widget stand-ins in ``qtHarness`` (PythonQt-flavoured ``qt``, ``ctk``, ``qMRMLNodeComboBox``,
  ``qMRMLWidget``).

Nothing here computes or fakes results: segmentations come from the real engine in its worker process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import slicer

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SlicerUNetSeg"
SLICER_PYTHON_VERSION = "v5.10.0"


def sharedSlicerPython() -> Path:
    """Where Slicer's own pure-Python modules are: ``$UNETSEG_SHARED/slicer-python/<version>``."""
    shared = Path(os.environ.get("UNETSEG_SHARED", REPO.parent / "shared"))
    return shared / "slicer-python" / SLICER_PYTHON_VERSION


def missingReason() -> str | None:
    """Why the suites cannot run here, or None."""
    folder = sharedSlicerPython()
    if not (folder / "slicer" / "parameterNodeWrapper" / "wrapper.py").is_file():
        return (f"Slicer's own Python modules were not found at {folder}: set UNETSEG_SHARED to the "
                "shared folder that holds slicer-python/ (Slicer's ScriptedLoadableModule, "
                "parameterNodeWrapper, i18n and testing, v5.10.0)")
    return None


class _Module:
    def __init__(self, logic=None, path=None) -> None:
        self._logic = logic
        self.path = path

    def logic(self):
        return self._logic


class _ModuleManager:
    """Accepts PythonQt-style string connections (``connect("signal(QString)", slot)``)."""

    def __init__(self) -> None:
        self.connections: list[tuple[str, object]] = []

    def connect(self, signal: str, slot) -> bool:
        self.connections.append((signal, slot))
        return True

    def disconnect(self, signal: str, slot) -> bool:
        if (signal, slot) in self.connections:
            self.connections.remove((signal, slot))
        return True


class _App:
    """The part of qSlicerApplication the module and Slicer's Python code use."""

    def __init__(self) -> None:
        self._moduleManager = _ModuleManager()

    def processEvents(self) -> None:
        qtWidgets = sys.modules.get("PySide6.QtWidgets")
        if qtWidgets is not None and qtWidgets.QApplication.instance() is not None:
            qtWidgets.QApplication.processEvents()

    def translate(self, context: str, text: str) -> str:
        from PySide6.QtCore import QCoreApplication

        return QCoreApplication.translate(context, text)

    def moduleManager(self) -> _ModuleManager:
        return self._moduleManager

    def applicationLogic(self):
        return slicer.modules.applicationLogic


def newScene():
    """A fresh scene with the logics the application attaches to it; becomes slicer.mrmlScene."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    subjectHierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subjectHierarchy.SetMRMLScene(scene)
    volumes = slicer.vtkSlicerVolumesLogic()  # slicer.util.updateSegmentBinaryLabelmapFromArray uses it
    volumes.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules.segmentations = _Module(segmentations)
    slicer.modules.subjecthierarchy = _Module(subjectHierarchy)
    slicer.modules.colors = _Module(colors)
    slicer.modules.volumes = _Module(volumes)
    slicer.modules._keepAlive = (colors, segmentations, subjectHierarchy, volumes)
    return scene


def moduleParent():
    """What the application passes to a scripted module's constructor (a qSlicerScriptedLoadableModule)."""
    return types.SimpleNamespace(path=str(MODULE_DIR / "SlicerUNetSeg.py"))


def _loadSlicerModule(name: str):
    """Load Slicer's own ``slicer.<name>`` from the shared folder.

    Loaded by path rather than by adding the folder to ``slicer.__path__``: slicer-core's
    ``slicer/__init__`` copies every public name of every module on its path onto ``slicer`` (its
    ``util`` would become parameterNodeWrapper's ``util``).
    """
    path = sharedSlicerPython() / "slicer" / name
    package = path.is_dir()
    spec = importlib.util.spec_from_file_location(
        f"slicer.{name}", path / "__init__.py" if package else path.with_suffix(".py"),
        submodule_search_locations=[str(path)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(slicer, name, module)
    return module


def install() -> None:
    """Install Qt, Slicer's own Python modules and the application stand-ins (idempotent)."""
    if getattr(slicer, "_unetsegHarness", False):
        return
    reason = missingReason()
    if reason:
        raise RuntimeError(reason)
    import qtHarness

    qtHarness.install()
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    slicer.app = _App()
    slicer.modules = types.SimpleNamespace(applicationLogic=slicer.vtkSlicerApplicationLogic(),
                                           slicerunetseg=_Module(path=str(MODULE_DIR / "SlicerUNetSeg.py")))
    slicer.qMRMLNodeComboBox = qtHarness.qMRMLNodeComboBox
    slicer.qMRMLWidget = qtHarness.qMRMLWidget
    for placeholder in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qSlicerWidget"):
        setattr(slicer, placeholder, type(placeholder, (), {"__doc__": "placeholder (not in our panel)"}))
    for name in ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule", "testing"):
        _loadSlicerModule(name)
    newScene()
    slicer._unetsegHarness = True


# the access token of the test server (``server`` fixture): the tests check it never reaches a log or a scene
SERVER_TOKEN = "slicer-test-token-" + "s" * 30
