"""The smallest honest stand-in for the Slicer *application* around the real MRML of slicer-core.

The slicer-core wheel has Slicer's MRML, segmentation core, module logics and ``slicer.util``, but not
what the application adds at start-up. This file provides only that:

- ``slicer.mrmlScene``: a real ``vtkMRMLScene`` with the real Colors, Segmentations and Subject
  Hierarchy logics attached (as the application does for every scene);
- ``slicer.app``: ``processEvents`` (a Qt event pump when Qt is up);
- ``slicer.modules``: ``segmentations.logic()``, ``subjecthierarchy.logic()``;
- ``slicer.ScriptedLoadableModule``: the four base classes, behaving like Slicer's (module name from
  the class name, a singleton ``vtkMRMLScriptedModuleNode`` as parameter node, ``resourcePath``);
- ``slicer.parameterNodeWrapper``: typed properties stored in that node (strings for plain values,
  node references for MRML nodes) and two-way ``connectGui`` binding through ``SlicerParameterName``.

Nothing here computes or fakes results: segmentations come from the real engine in its worker process.
"""

from __future__ import annotations

import os
import sys
import types
import typing
import unittest
from pathlib import Path

import slicer
import vtk

MODULE_DIR = Path(__file__).resolve().parents[2] / "SlicerUNetSeg"


class _Module:
    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


class _App:
    """The part of qSlicerApplication the module uses."""

    def processEvents(self) -> None:
        qtWidgets = sys.modules.get("PySide6.QtWidgets")
        if qtWidgets is not None and qtWidgets.QApplication.instance() is not None:
            qtWidgets.QApplication.processEvents()

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
    slicer.mrmlScene = scene
    slicer.modules.segmentations = _Module(segmentations)
    slicer.modules.subjecthierarchy = _Module(subjectHierarchy)
    slicer.modules.colors = _Module(colors)
    slicer.modules._keepAlive = (colors, segmentations, subjectHierarchy)
    return scene


# ---- slicer.ScriptedLoadableModule ----------------------------------------------------------------
class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        for name, value in (("title", ""), ("categories", []), ("dependencies", []), ("contributors", []),
                            ("helpText", ""), ("acknowledgementText", "")):
            setattr(parent, name, value)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        name = self.__class__.__name__
        self.moduleName = name[:-5] if name.endswith("Logic") else name

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        import qt

        name = self.__class__.__name__
        self.moduleName = name[:-6] if name.endswith("Widget") else name
        self.developerMode = False
        if parent is None:
            parent = qt.QWidget()
            parent.setLayout(qt.QVBoxLayout())
        self.parent = parent
        self.layout = parent.layout()

    def resourcePath(self, filename: str) -> str:
        moduleFile = sys.modules[self.__class__.__module__].__file__
        return os.path.join(os.path.dirname(moduleFile), "Resources", filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        print(message)


# ---- slicer.parameterNodeWrapper ------------------------------------------------------------------
def _isNodeType(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, slicer.vtkMRMLNode)


def _parse(annotation, text: str):
    if annotation is bool:
        return text == "True"
    return annotation(text)


class WithinRange:
    """Slicer's validator of the same name: the value must lie in [minimum, maximum]."""

    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _spinBoxRange(annotated) -> tuple[float, float]:
    """The range Slicer's spin-box connector gives a widget: the annotation's ``WithinRange``, else
    -inf..inf (Slicer overrides whatever range the .ui file set)."""
    for item in typing.get_args(annotated)[1:]:
        if isinstance(item, WithinRange):
            return item.minimum, item.maximum
    return float("-inf"), float("inf")


def parameterNodeWrapper(cls):
    """Typed access to a vtkMRMLScriptedModuleNode, like Slicer's decorator of the same name."""
    hints = typing.get_type_hints(cls)
    annotated = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: cls.__dict__.get(name) for name in hints}

    def makeProperty(name, annotation):
        if _isNodeType(annotation):
            return property(lambda self: self.parameterNode.GetNodeReference(name),
                            lambda self, node: self.parameterNode.SetNodeReferenceID(
                                name, node.GetID() if node is not None else None))
        return property(lambda self: _parse(annotation, self.parameterNode.GetParameter(name)),
                        lambda self, value: self.parameterNode.SetParameter(name, str(value)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guiConnections = {}
        for name, annotation in hints.items():
            if not _isNodeType(annotation) and not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, str(defaults[name] if defaults[name] is not None
                                                      else annotation()))

    for name, annotation in hints.items():
        setattr(cls, name, makeProperty(name, annotation))
    cls.__init__ = __init__
    cls._annotated = annotated
    cls.connectGui = _connectGui
    cls.disconnectGui = _disconnectGui
    cls.allParameters = property(lambda self: {n: getattr(self, n) for n in hints})
    return cls


def _widgetBinding(widget):
    """(read, write, changed signal) for the widget kinds the module binds."""
    className = type(widget).__name__
    if className == "qMRMLNodeComboBox":
        return widget.currentNode, widget.setCurrentNode, widget.currentNodeChanged
    if className in ("QDoubleSpinBox", "QSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"):
        return widget.value, widget.setValue, widget.valueChanged
    if className in ("QCheckBox", "QRadioButton") or (className == "QPushButton" and widget.isCheckable()):
        return widget.isChecked, widget.setChecked, widget.toggled
    if className == "QComboBox":
        return widget.currentText, widget.setCurrentText, widget.currentTextChanged
    if className == "QLineEdit":
        return widget.text, widget.setText, widget.textChanged
    raise TypeError(f"No parameter connector for {className}")


def _connectGui(self, ui):
    tag = object()
    bindings = []
    for widget in vars(ui).values():
        name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
        if not name:
            continue
        read, write, changed = _widgetBinding(widget)
        if type(widget).__name__ in ("QDoubleSpinBox", "QSpinBox"):
            widget.setRange(*_spinBoxRange(self._annotated[name]))

        def setter(value, n=name):
            setattr(self, n, value)
        changed.connect(setter)
        bindings.append((name, read, write, changed, setter))

    def toGui(caller=None, event=None):
        for name, read, write, changed, setter in bindings:
            value = getattr(self, name)
            if read() != value:
                widget = write.__self__
                blocked = widget.blockSignals(True)
                write(value)
                widget.blockSignals(blocked)

    observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, toGui)
    toGui()
    self._guiConnections[tag] = (bindings, observer)
    return tag


def _disconnectGui(self, tag):
    bindings, observer = self._guiConnections.pop(tag, ([], None))
    for name, read, write, changed, setter in bindings:
        changed.disconnect(setter)
    if observer is not None:
        self.parameterNode.RemoveObserver(observer)


def install() -> None:
    """Install the stand-ins (idempotent) and make the module folder importable."""
    if getattr(slicer, "_unetsegHarness", False):
        return
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    slicer.app = _App()
    slicer.modules = types.SimpleNamespace(applicationLogic=slicer.vtkSlicerApplicationLogic())
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for item in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                 ScriptedLoadableModuleTest):
        setattr(scripted, item.__name__, item)
    scripted.__all__ = [item for item in vars(scripted) if item.startswith("Scripted")]
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameterNodeWrapper
    wrapper.WithinRange = WithinRange
    sys.modules["slicer.ScriptedLoadableModule"] = slicer.ScriptedLoadableModule = scripted
    sys.modules["slicer.parameterNodeWrapper"] = slicer.parameterNodeWrapper = wrapper
    newScene()
    slicer._unetsegHarness = True
