"""The module logic with "Run on: a server": a real ``unetseg serve`` subprocess on loopback, the real
MRML of slicer-core. The segments must be the local run's, voxel for voxel; progress, cancel and a
wrong token behave as in a local run (the scene is left as it was)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_slicer_logic import exportLabels, sceneState, segmentNames

import harness
from SlicerUNetSegLib.geometry import loadVolumeFile
from SlicerUNetSegLib.testing import TINY_MODEL_ID
from unetseg_engine.errors import UNetSegError

pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn")
TOKEN = harness.SERVER_TOKEN
pytestmark = pytest.mark.slicer


@pytest.fixture
def remote(server):
    from SlicerUNetSegLib.logic import SlicerUNetSegLogic

    instance = SlicerUNetSegLogic()
    instance.useServer(server.url, TOKEN)
    yield instance
    instance.shutdown()


@pytest.fixture
def ct(scene, openkbp):
    return loadVolumeFile(openkbp[0], "pt_201 CT")


def test_a_server_run_gives_the_local_segments(remote, logic, ct):
    stages = []
    onServer = remote.process(ct, None, TINY_MODEL_ID, device="cpu",
                              onProgress=lambda stage, fraction: stages.append(stage))
    local = logic.process(ct, None, TINY_MODEL_ID, device="cpu", runtime="torch")
    assert segmentNames(onServer) == segmentNames(local)
    for a, b in zip(range(onServer.GetSegmentation().GetNumberOfSegments()),
                    range(local.GetSegmentation().GetNumberOfSegments())):
        assert np.allclose(onServer.GetSegmentation().GetNthSegment(a).GetColor(),
                           local.GetSegmentation().GetNthSegment(b).GetColor())
    remoteLabels, localLabels = exportLabels(onServer, ct), exportLabels(local, ct)
    assert localLabels.any() and np.array_equal(remoteLabels, localLabels)
    # the client's own stages around the server's, relayed from its status polls (a poll may miss
    # a short stage such as inference on a quiet machine; the engine's "done" is always reported)
    assert stages[0] == "uploading to the server" and "done" in stages
    assert stages.index("done") < stages.index("downloading the result")
    assert remote.job.device.startswith("server http://127.0.0.1:")
    assert "upload_s" in remote.job.timings


def test_cancel_on_a_server_leaves_the_scene(remote, ct, scene):
    before = sceneState(scene)
    job = remote.startSegmentation(ct, None, TINY_MODEL_ID, onProgress=lambda stage, fraction: None)
    remote.cancel()
    while remote.poll():
        time.sleep(0.02)
    assert job.state == "cancelled" and job.segmentationNode is None
    assert sceneState(scene) == before
    assert not remote.runner.isBusy()


def test_a_wrong_token_or_an_unserved_model_is_a_clear_error(server, ct, scene):
    from SlicerUNetSegLib.logic import SlicerUNetSegLogic

    before = sceneState(scene)
    wrong = SlicerUNetSegLogic()
    wrong.useServer(server.url, "not-the-token-at-all")
    with pytest.raises(UNetSegError, match="wrong token"):
        wrong.process(ct, None, TINY_MODEL_ID)
    right = SlicerUNetSegLogic()
    right.useServer(server.url, TOKEN)
    with pytest.raises(UNetSegError, match="does not serve the model 'openkbp-hn-oar'"):
        right.process(ct, None, "openkbp-hn-oar")
    assert sceneState(scene) == before
    for instance in (wrong, right):
        instance.shutdown()
