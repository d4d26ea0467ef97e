"""pytest fixtures shared by the engine suites."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_package, tiny_meta  # noqa: E402


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """A real, randomly initialised 3-class CT model package."""
    return make_package(tmp_path_factory.mktemp("models") / "tiny-test", tiny_meta())


@pytest.fixture(scope="session")
def tiny_multilabel_package(tmp_path_factory):
    """A multi-label (sigmoid) package whose channels overlap: biases push two channels on."""
    meta = tiny_meta("tiny-multilabel", multilabel=True, n_labels=3)
    return make_package(tmp_path_factory.mktemp("models") / "tiny-multilabel", meta,
                        bias={0: 3.0, 1: 3.0, 2: -3.0})


@pytest.fixture(scope="session")
def runtime_cache(tmp_path_factory):
    """One runtime cache (exported ONNX graphs, auto's measurements) for the test session."""
    return tmp_path_factory.mktemp("unetseg-cache")


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch, runtime_cache):
    """Two cores on CI: keep each test to its share. The runtime cache stays out of the home folder."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("UNETSEG_CACHE", str(runtime_cache))
