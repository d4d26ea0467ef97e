"""Offscreen Qt for the panel tests: PySide6 as Slicer's ``qt`` module, plus the two CTK/qMRML widgets
the .ui uses, reduced to the behaviour the panel relies on.

- ``qt``: the QtCore/QtGui/QtWidgets classes in one namespace (as PythonQt's ``qt`` module has them),
  and a ``QUiLoader`` that knows the two stand-ins below.
- ``ctkCollapsibleButton``: a titled container with ``text`` and ``collapsed`` properties.
- ``qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes`` (kept current through scene
  observers), an optional "none" entry (``noneEnabled``/``noneDisplay``), ``currentNode`` /
  ``setCurrentNode`` and the ``currentNodeChanged`` signal.
Everything else in the panel is real Qt.
"""

from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402
from PySide6.QtCore import Property, Signal  # noqa: E402


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


class QUiLoader(QtUiTools.QUiLoader):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.registerCustomWidget(ctkCollapsibleButton)
        self.registerCustomWidget(qMRMLNodeComboBox)


def install() -> QtWidgets.QApplication:
    """Provide ``import qt`` and a QApplication (offscreen)."""
    if "qt" not in sys.modules:
        qt = types.ModuleType("qt")
        for module in (QtCore, QtGui, QtWidgets):
            for name in dir(module):
                if not name.startswith("_"):
                    setattr(qt, name, getattr(module, name))
        qt.QUiLoader = QUiLoader
        sys.modules["qt"] = qt
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(["SlicerUNetSegTest"])
