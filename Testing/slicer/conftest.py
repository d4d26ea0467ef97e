"""Fixtures for the Slicer-side suites: the application stand-ins, a tiny real model, one shared logic
(one worker process for the session, so the model stays warm as it does in Slicer)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# slicer-core's slicer/__init__ takes every "<sys.path entry>/slicer" folder as part of the package
# and imports all its modules, copying their public names onto slicer: with Testing/ on sys.path (the
# engine suites' conftest puts it there) that is this folder, and slicer.app would become the test
# module's QApplication. Import slicer without Testing/ on the path.
_testing = Path(__file__).resolve().parent.parent
_path = list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _testing]
try:
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
finally:
    sys.path[:] = _path
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

pytest.importorskip("PySide6", reason="PySide6 is needed: Slicer's own Python code imports qt")
import harness  # noqa: E402  (Testing/slicer is on sys.path: rootdir-relative conftest)

MISSING = harness.missingReason()
if not MISSING:
    harness.install()
NEEDS_SLICER_CODE = ("test_slicer_logic.py", "test_slicer_widget.py", "test_slicer_review.py",
                     "test_slicer_review_widget.py", "test_slicer_learning.py")


def pytest_collection_modifyitems(config, items):
    """Without Slicer's own Python code the module cannot be imported: skip its suites, saying why."""
    if MISSING:
        for item in items:
            if item.path.name in NEEDS_SLICER_CODE:
                item.add_marker(pytest.mark.skip(reason=MISSING))

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO / "SlicerUNetSeg" / "Resources" / "Models" / "openkbp-hn-oar"


@pytest.fixture(scope="session")
def modelsDir(tmp_path_factory):
    """A models folder holding the tiny test model, first on the engine's search path."""
    from SlicerUNetSegLib.testing import makeTinyModel

    folder = tmp_path_factory.mktemp("models")
    makeTinyModel(folder)
    old = {k: os.environ.get(k) for k in ("UNETSEG_MODELS_PATH", "UNETSEG_USER_MODELS")}
    os.environ["UNETSEG_MODELS_PATH"] = str(folder)
    os.environ["UNETSEG_USER_MODELS"] = str(tmp_path_factory.mktemp("user-models"))
    yield folder
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


LAUNCHER = Path(__file__).resolve().parent / "fakeLauncher.py"


@pytest.fixture(scope="session")
def logic(modelsDir):
    """The worker starts through a launcher, as PythonSlicer starts python-real in Slicer."""
    import sys

    from SlicerUNetSegLib.logic import SlicerUNetSegLogic
    from SlicerUNetSegLib.workerRunner import WorkerRunner

    instance = SlicerUNetSegLogic(runner=WorkerRunner(python=[sys.executable, str(LAUNCHER)]))
    yield instance
    instance.shutdown()


@pytest.fixture(scope="session")
def server(modelsDir, tmp_path_factory):
    """``unetseg serve`` in a subprocess on loopback, serving the tiny model."""
    pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn")
    from helpers import ServerProcess

    folder = tmp_path_factory.mktemp("slicer-server")
    token = folder / "token.txt"
    token.write_text(harness.SERVER_TOKEN)
    token.chmod(0o600)
    running = ServerProcess(folder / "state", token, [modelsDir / "unetseg-tiny-test"])
    yield running
    running.stop()
    assert harness.SERVER_TOKEN not in "".join(running.log)


@pytest.fixture
def scene():
    return harness.newScene()


@pytest.fixture(scope="session")
def defaultModel():
    if not (DEFAULT_MODEL_DIR / "metadata.json").is_file():
        pytest.skip(f"the default model is not installed yet ({DEFAULT_MODEL_DIR.relative_to(REPO)}); "
                    "accuracy checks need it")
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def openkbp():
    from SlicerUNetSegLib.testing import openkbpCase

    case = openkbpCase("pt_201")
    if case is None:
        pytest.skip("OpenKBP test data not found: set UNETSEG_DATA to the shared data folder")
    return case


@pytest.fixture(scope="session")
def syntheticCtFile(tmp_path_factory):
    """A CT-like volume with an oblique direction, a flipped axis and anisotropic voxels, as a file for
    Slicer's reader: the suites that check geometry and the path, not anatomy, run without the data.
    Large enough (448 x 384 x 320 mm) that a 0.9-overlap run takes seconds (the cancel tests)."""
    from helpers import OBLIQUE_FLIPPED, synthetic_ct_file

    return synthetic_ct_file(tmp_path_factory.mktemp("synthetic"), "synthetic_ct.nrrd",
                             shape_kji=(64, 128, 128), spacing=(3.5, 3.0, 5.0),
                             direction=OBLIQUE_FLIPPED)


@pytest.fixture(autouse=True)
def _few_threads():
    """Overrides the engine suites' OMP_NUM_THREADS=2: the worker inherits the caller's setting (run
    these suites with OMP_NUM_THREADS=1 on a shared machine)."""
    yield
