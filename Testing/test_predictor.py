"""The Predictor's contract with its callers (CLI and Slicer module): progress, cancel, warm reuse,
2D slice-wise models, several input channels, and multi-label outputs with overlapping segments."""

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import data_path, make_package, openkbp, tiny_meta
from unetseg_engine.errors import CancelledError, UNetSegError
from unetseg_engine.imageio import read_image
from unetseg_engine.inference import Predictor


@pytest.fixture(scope="module")
def ct():
    return read_image(openkbp("pt_201")[0])


def test_progress_reports_stages_and_reaches_100_percent(ct, tiny_package):
    events = []
    predictor = Predictor(device="cpu")
    predictor.load(tiny_package)
    predictor.predict([ct], progress=lambda stage, f: events.append((stage, f)))
    stages = [s for s, _ in events]
    assert stages[0] == "preprocessing" and stages[-1] == "done"
    inference = [f for s, f in events if s == "inference"]
    assert len(inference) >= 2 and inference == sorted(inference) and inference[-1] == 1.0


def test_cancel_between_windows_raises_and_returns_nothing(ct, tiny_package):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2  # cancel after the second window batch

    predictor = Predictor(device="cpu", sw_batch_size=1)
    predictor.load(tiny_package)
    with pytest.raises(CancelledError):
        predictor.predict([ct], cancel=cancel)
    assert predictor.predict([ct]).label_map.GetSize() == ct.GetSize()  # still usable afterwards


def test_loading_the_same_model_again_is_a_no_op(tiny_package):
    predictor = Predictor(device="cpu")
    predictor.load(tiny_package)
    networks = predictor.networks
    predictor.load(tiny_package)
    assert predictor.networks is networks


def test_2d_model_runs_slice_by_slice_onto_the_input_grid(ct, tmp_path):
    package = make_package(tmp_path / "tiny2d", tiny_meta("tiny-2d", spatial_dims=2))
    predictor = Predictor(device="cpu")
    predictor.load(package)
    result = predictor.predict([ct])
    assert result.label_map.GetSize() == ct.GetSize()
    assert sitk.GetArrayViewFromImage(result.label_map).any()


def test_two_channel_mr_model_takes_flair_and_t1c(tmp_path):
    case = data_path("brats2015_deepmedic_mri", "brats2015TrainingData", "test", "brats_2013_pat0001_1")
    flair, t1c = read_image(case / "Flair_subtrMeanDivStd.nii.gz"), read_image(
        case / "T1c_subtrMeanDivStd.nii.gz")
    package = make_package(tmp_path / "mr", tiny_meta("tiny-mr", n_inputs=2, modality="MR"))
    predictor = Predictor(device="cpu")
    predictor.load(package)
    result = predictor.predict([flair, t1c])
    assert result.label_map.GetSize() == flair.GetSize()
    with pytest.raises(UNetSegError, match="takes 2 input"):
        predictor.predict([flair])


def test_multilabel_overlaps_become_overlapping_segments(ct, tiny_multilabel_package, tmp_path):
    import slicerio

    from unetseg_engine.segfile import write_seg_nrrd

    predictor = Predictor(device="cpu")
    predictor.load(tiny_multilabel_package)
    result = predictor.predict([ct])
    (box1, m1), (box2, m2) = result.masks[1], result.masks[2]
    full = [np.zeros(ct.GetSize()[::-1], bool) for _ in range(2)]
    full[0][box1.slices_kji()] = m1
    full[1][box2.slices_kji()] = m2
    overlap = full[0] & full[1]
    assert overlap.sum() > 100  # the biased channels overlap: a multi-class argmax could not say so
    out = tmp_path / "ml.seg.nrrd"
    write_seg_nrrd(out, result.label_map, tiny_multilabel_package.labels, result.masks)
    seg = slicerio.read_segmentation(str(out))
    assert seg["voxels"].ndim == 4  # (layer, i, j, k)
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"Structure1", "Structure2", "Structure3"}
    assert by_name["Structure1"]["layer"] != by_name["Structure2"]["layer"]
    layer1 = seg["voxels"][by_name["Structure1"]["layer"]].transpose(2, 1, 0) == 1
    layer2 = seg["voxels"][by_name["Structure2"]["layer"]].transpose(2, 1, 0) == 2
    np.testing.assert_array_equal(layer1, full[0])
    np.testing.assert_array_equal(layer1 & layer2, overlap)


@pytest.mark.parametrize("affine", [False, True])
def test_channels_last_instance_norm_computes_what_instance_norm_does(affine):
    import torch

    from unetseg_engine.networks import build_network, channels_last_instance_norm

    torch.manual_seed(0)
    norm = ["instance", {"affine": True}] if affine else "instance"
    net = build_network("UNet", 3, 1, 4, {"channels": [8, 16, 32], "strides": [2, 2],
                                          "num_res_units": 1, "norm": norm}).eval()
    if affine:  # non-trivial scale and shift, so a dropped weight or bias would show
        for m in net.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                torch.nn.init.uniform_(m.weight, 0.5, 2.0)
                torch.nn.init.uniform_(m.bias, -1.0, 1.0)
    x = (torch.rand(2, 1, 32, 24, 40) * 3 + 1).contiguous(memory_format=torch.channels_last_3d)
    net = net.to(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        expected = net(x)
        n_norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
        assert channels_last_instance_norm(net) == n_norms > 0
        assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
        got = net(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
