"""Offscreen Qt for the Slicer-side suites: PySide6 as Slicer's ``qt`` module, behaving like PythonQt
where Slicer's own Python code depends on it, plus the few CTK/qMRML widgets our panel uses.

Stand-ins (only what needs the application's C++ widgets or PythonQt):

- ``qt``: the QtCore/QtGui/QtWidgets classes in one namespace (as PythonQt's ``qt`` module has them).
  The widget classes our ``.ui`` instantiates are PythonQt-flavoured: every Qt property is a Python
  attribute (``spinBox.value``, ``checkBox.checked = True``, ``label.text``) that shadows the getter
  of the same name, as in Slicer, because Slicer's parameterNodeWrapper GUI connectors read and write
  widgets that way. ``QUiLoader`` creates those classes and knows the stand-ins below.
- ``ctk``: ``ctkCollapsibleButton`` (a titled container with ``text`` and ``collapsed``); every other
  ``ctk`` name is an empty placeholder class, so that the wrapper's ``type(widget) in (...)`` checks
  run (none of those widgets is in our panel).
- ``slicer.qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes`` (kept current through scene
  observers), an optional "none" entry, ``currentNode`` / ``setCurrentNode``, ``currentNodeChanged``.
- ``slicer.qMRMLWidget``: a QWidget with ``setMRMLScene``; the other ``qMRML*``/``qSlicer*`` names
  Slicer's wrapper mentions are placeholders.
Everything else in the panel is real Qt.
"""

from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402


def pythonQtFlavoured(base):
    """A subclass of a Qt widget class whose Qt properties are Python attributes, as in PythonQt."""
    meta = base.staticMetaObject
    namespace = {"__doc__": f"{base.__name__} with PythonQt's attribute access to its Qt properties",
                 "__module__": "qt"}
    for index in range(meta.propertyCount()):
        name = meta.property(index).name()
        namespace[name] = property(lambda self, n=name: QtCore.QObject.property(self, n),
                                   lambda self, value, n=name: QtCore.QObject.setProperty(self, n, value))
    return type(base.__name__, (base,), namespace)


# The leaf widget classes the panel's .ui creates, and those Slicer's GUI connectors compare with
# type(widget) == qt.X. (QWidget itself stays plain: findChildren(qt.QWidget) must find every widget.)
FLAVOURED = {cls.__name__: pythonQtFlavoured(cls) for cls in (
    QtWidgets.QLabel, QtWidgets.QComboBox, QtWidgets.QPushButton, QtWidgets.QCheckBox,
    QtWidgets.QDoubleSpinBox, QtWidgets.QSpinBox, QtWidgets.QSlider, QtWidgets.QProgressBar,
    QtWidgets.QPlainTextEdit, QtWidgets.QTextEdit, QtWidgets.QLineEdit)}


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False

    def _text(self) -> str:
        return self.title()

    def _setText(self, text: str) -> None:
        self.setTitle(text)

    def _isCollapsed(self) -> bool:
        return self._collapsed

    def setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
            child.setVisible(not collapsed)

    text = Property(str, _text, _setText)
    collapsed = Property(bool, _isCollapsed, setCollapsed)


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._nodeTypes: list[str] = []
        self._noneEnabled = False
        self._noneDisplay = "None"
        self._scene = None
        self._observers: list[int] = []
        self._flags = {}
        self.currentIndexChanged.connect(self._onIndexChanged)

    # properties set from the .ui
    def _getNodeTypes(self):
        return list(self._nodeTypes)

    def _setNodeTypes(self, types_):
        self._nodeTypes = list(types_)
        self._refresh()

    def _getNoneEnabled(self):
        return self._noneEnabled

    def _setNoneEnabled(self, value):
        self._noneEnabled = bool(value)
        self._refresh()

    def _getNoneDisplay(self):
        return self._noneDisplay

    def _setNoneDisplay(self, value):
        self._noneDisplay = value
        self._refresh()

    def _flag(name):  # noqa: N805  (helper building boolean properties the panel sets but never reads)
        return Property(bool, lambda self: self._flags.get(name, False),
                        lambda self, value: self._flags.__setitem__(name, bool(value)))

    nodeTypes = Property("QStringList", _getNodeTypes, _setNodeTypes)
    noneEnabled = Property(bool, _getNoneEnabled, _setNoneEnabled)
    noneDisplay = Property(str, _getNoneDisplay, _setNoneDisplay)
    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    renameEnabled = _flag("renameEnabled")
    showChildNodeTypes = _flag("showChildNodeTypes")

    # the qMRMLNodeComboBox API the panel uses
    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observers = [scene.AddObserver(event, lambda caller, event: self._refresh())
                           for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _nodes(self):
        if self._scene is None:
            return []
        out = []
        for i in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(i)
            if any(node.GetClassName() == t for t in self._nodeTypes) and not node.GetHideFromEditors():
                out.append(node)
        return out

    def _refresh(self) -> None:
        current = self.currentNode()
        blocked = self.blockSignals(True)
        self.clear()
        if self._noneEnabled:
            self.addItem(self._noneDisplay, None)
        for node in self._nodes():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(current.GetID()) if current is not None else (0 if self._noneEnabled else -1)
        if index < 0 and not self._noneEnabled and self.count():
            index = 0
        self.setCurrentIndex(index)
        self.blockSignals(blocked)
        if self.currentNode() is not current:
            self._onIndexChanged(self.currentIndex())

    def currentNode(self):
        nodeId = self.currentData() if self.currentIndex() >= 0 else None
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene is not None) else None

    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node else ""

    def setCurrentNode(self, node) -> None:
        if node is not None and self.findData(node.GetID()) < 0:
            self._refresh()
        index = self.findData(node.GetID()) if node is not None else (0 if self._noneEnabled else -1)
        self.setCurrentIndex(index)

    def setCurrentNodeID(self, nodeId: str) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(nodeId) if nodeId else None)

    def _onIndexChanged(self, index) -> None:
        node = self.currentNode()
        self.currentNodeChanged.emit(node)
        self.currentNodeIDChanged.emit(node.GetID() if node else "")


class qMRMLWidget(QtWidgets.QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def mrmlScene(self):
        return self._scene


class QUiLoader(QtUiTools.QUiLoader):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.registerCustomWidget(ctkCollapsibleButton)
        self.registerCustomWidget(qMRMLNodeComboBox)

    def createWidget(self, className, parent=None, name=""):
        flavoured = FLAVOURED.get(className)
        if flavoured is None:
            return super().createWidget(className, parent, name)
        widget = flavoured(parent)
        widget.setObjectName(name)
        return widget


def _placeholderModule(name: str, known: dict) -> types.ModuleType:
    """A module whose unknown attributes are distinct empty classes (never instantiated by us)."""
    module = types.ModuleType(name)
    module.__dict__.update(known)
    cache: dict[str, type] = {}

    def __getattr__(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        if attribute not in cache:
            cache[attribute] = type(attribute, (), {"__doc__": f"placeholder for {name}.{attribute}"})
        return cache[attribute]

    module.__getattr__ = __getattr__
    return module


def install() -> QtWidgets.QApplication:
    """Provide ``import qt`` and ``import ctk`` and a QApplication (offscreen)."""
    if "qt" not in sys.modules:
        qt = types.ModuleType("qt")
        for module in (QtCore, QtGui, QtWidgets):
            for name in dir(module):
                if not name.startswith("_"):
                    setattr(qt, name, getattr(module, name))
        for name, cls in FLAVOURED.items():
            setattr(qt, name, cls)
        qt.QUiLoader = QUiLoader
        sys.modules["qt"] = qt
        sys.modules["ctk"] = _placeholderModule("ctk", {"ctkCollapsibleButton": ctkCollapsibleButton})
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(["SlicerUNetSegTest"])
