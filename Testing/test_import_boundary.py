"""The engine stays Slicer-free, and listing models needs no torch (the panel lists them before
PyTorch is installed)."""

import subprocess
import sys

from helpers import REPO

ENGINE = REPO / "SlicerUNetSeg" / "unetseg_engine"


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_engine_imports_no_slicer_qt_ctk_or_vtk():
    modules = sorted(p.relative_to(ENGINE.parent).with_suffix("").as_posix().replace("/", ".")
                     for p in ENGINE.rglob("*.py") if p.name != "__main__.py")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('slicer', 'qt', 'ctk', 'vtk', 'vtkmodules', 'PySide6', 'PythonQt', 'mrml'))\n"
            "print(len({0!r}), bad)".format(modules))
    count, bad = run_python(code).split(" ", 1)
    assert int(count) > 10
    assert bad == "[]"


def test_listing_models_does_not_import_torch():
    out = run_python("import sys, unetseg_engine.modelpkg as m; m.list_models(); "
                     "print('torch' in sys.modules, 'monai' in sys.modules)")
    assert out == "False False"
