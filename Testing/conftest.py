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


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    """Two cores on CI: keep each test to its share."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
