"""Every bad input gets one clear error line, exit status 2, and leaves no file behind.

The scans are small synthetic volumes: these run without the shared data."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import synthetic_ct_file
from unetseg_engine.cli import main


def write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def volume(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([2.0, 2.0, 2.0])
    return image


def tampered_weights(tmp_path, package):
    copy = tmp_path / "tampered"
    shutil.copytree(package.path, copy)
    data = bytearray((copy / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    return str(copy)


def invalid_metadata(tmp_path, package):
    copy = tmp_path / "invalid"
    shutil.copytree(package.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["network"]["architecture"] = "os.system"
    (copy / "metadata.json").write_text(json.dumps(meta))
    return str(copy)


CASES = {
    # name: (function(tmp_path, package) -> (inputs, model, output), expected words in the message)
    "missing file": (lambda t, p: ([str(t / "nope.nii.gz")], None, t / "out" / "o.nii.gz"),
                     "does not exist"),
    "unreadable file": (lambda t, p: ([_garbage(t)], None, t / "out" / "o.nii.gz"), "Could not read"),
    "2D image": (lambda t, p: ([write(sitk.Image([64, 64], sitk.sitkInt16) + 5, t / "a.nrrd")], None,
                               t / "out" / "o.nii.gz"), "2D"),
    "single slice": (lambda t, p: ([write(volume(np.arange(4096, dtype=np.int16).reshape(1, 64, 64)),
                                          t / "s.nrrd")], None, t / "out" / "o.nii.gz"), "single slice"),
    "4D volume": (lambda t, p: ([write(sitk.JoinSeries([volume(np.random.rand(8, 8, 8).astype(
        np.float32))] * 3), t / "f.nii.gz")], None, t / "out" / "o.nii.gz"), "4D"),
    "NaN voxels": (lambda t, p: ([write(volume(_with_nan()), t / "n.nrrd")], None,
                                 t / "out" / "o.nii.gz"), "NaN"),
    "empty volume": (lambda t, p: ([write(volume(np.full((8, 8, 8), -1024, np.int16)), t / "e.nrrd")],
                                   None, t / "out" / "o.nii.gz"), "empty"),
    "wrong number of inputs": (lambda t, p: ([scan(t)] * 2, None, t / "out" / "o.nii.gz"),
                               "takes 1 input"),
    "unknown model": (lambda t, p: ([scan(t)], "no-such-model", t / "out" / "o.nii.gz"),
                      "Unknown model 'no-such-model'"),
    "tampered weights": (lambda t, p: ([scan(t)], tampered_weights(t, p),
                                       t / "out" / "o.nii.gz"), "checksum"),
    "metadata fails the schema": (lambda t, p: ([scan(t)], invalid_metadata(t, p),
                                                t / "out" / "o.nii.gz"), "invalid"),
    "output folder missing": (lambda t, p: ([scan(t)], None, t / "missing" / "o.nii.gz"),
                              "does not exist"),
    "unsupported output": (lambda t, p: ([scan(t)], None, t / "out" / "o.png"),
                           "Unsupported output"),
}


def scan(tmp_path) -> str:
    """A good CT (oblique-free, 2-3 mm voxels) beside the output folder."""
    return str(synthetic_ct_file(tmp_path / "in"))


def _garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not an image" * 10)
    return str(path)


def _with_nan():
    a = np.random.rand(8, 8, 8).astype(np.float32)
    a[3, 3, 3] = np.nan
    return a


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line_and_no_output(case, tmp_path, tiny_package, capsys):
    make, words = CASES[case]
    inputs, model, output = make(tmp_path, tiny_package)
    (tmp_path / "out").mkdir(exist_ok=True)
    model = model or str(tiny_package.path)
    if case == "unknown model":
        model = "no-such-model"
    status = main(["segment", *inputs, "-o", str(output), "--model", model, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("unetseg: error: ")
    assert words in err[0]
    assert not output.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary leftovers either
