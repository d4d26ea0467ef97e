"""Bad files and arguments found by fuzzing the command line (issue 19).

Each case gets one ``unetseg: error: ...`` line, exit status 2, leaves the inputs as they were and no
file behind. The volumes are small synthetic ones built here, so the suite needs no patient data.
"""

from __future__ import annotations

import gzip
import os
import signal
import stat
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from helpers import REPO, make_package, tiny_meta
from unetseg_engine.cli import main


def ct_like(shape_kji=(24, 40, 40), dtype=np.int16, seed: int = 0) -> sitk.Image:
    """Air (-1000 HU) around a noisy soft-tissue ellipsoid (about 40 HU), 2 mm voxels."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[tuple(slice(0, n) for n in shape_kji)]
    centre = [n / 2 for n in shape_kji]
    inside = sum(((a - c) / (0.4 * n)) ** 2 for a, c, n in zip((k, j, i), centre, shape_kji)) < 1
    array = np.where(inside, 40 + rng.normal(0, 20, shape_kji), -1000 + rng.normal(0, 5, shape_kji))
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing([2.0, 2.0, 2.0])
    return image


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def run_segment(capsys, inputs, output, package, *extra) -> tuple[int, list[str]]:
    """Run ``unetseg segment`` in this process; returns (status, stderr lines)."""
    status = main(["segment", *map(str, inputs), "-o", str(output), "--model", str(package.path), "-q",
                   *extra])
    return status, capsys.readouterr().err.strip().splitlines()


def assert_refused(status: int, err: list[str], words: str) -> None:
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("unetseg: error: "), err
    assert words.lower() in err[0].lower(), err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- D1: an output that is one of the inputs ---------------------------------------------------
def _same(t: Path, scan: Path) -> Path:
    return scan


def _other_spelling(t: Path, scan: Path) -> Path:
    (t / "sub").mkdir()
    return t / "sub" / ".." / "." / scan.name


def _symlink(t: Path, scan: Path) -> Path:
    link = t / "link.nii.gz"
    link.symlink_to(scan)
    return link


def _hard_link(t: Path, scan: Path) -> Path:
    link = t / "hard.nii.gz"
    os.link(scan, link)
    return link


@pytest.mark.parametrize("spelling", [_same, _other_spelling, _symlink, _hard_link],
                         ids=["same path", "other spelling", "symlink", "hard link"])
def test_output_that_is_an_input_is_refused(spelling, tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nii.gz")
    output = spelling(tmp_path, scan)
    before = snapshot(tmp_path)
    status, err = run_segment(capsys, [scan], output, tiny_package)
    assert_refused(status, err, "is the input")
    assert snapshot(tmp_path) == before


def dicom_series(folder: Path, image: sitk.Image) -> Path:
    """Write ``image`` as a DICOM series, one file per slice."""
    folder.mkdir()
    array = sitk.GetArrayFromImage(image)
    uid = "1.2.826.0.1.3680043.2.1125.1.19019"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        slice_ = sitk.GetImageFromArray(array[k:k + 1])
        slice_.SetSpacing(image.GetSpacing())
        for tag, value in [("0020|000e", uid), ("0020|000d", uid + ".1"), ("0008|0018", f"{uid}.2.{k}"),
                           ("0020|0032", f"0\\0\\{2.0 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(k + 1)), ("0008|0060", "CT"), ("0028|0030", "2\\2")]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


@pytest.mark.parametrize("link", ["hard link", "symlink"])
def test_output_that_is_a_file_of_the_input_dicom_series_is_refused(link, tmp_path, tiny_package, capsys):
    folder = dicom_series(tmp_path / "dicom", ct_like())
    output = tmp_path / "labels.nii"
    target = folder / "slice003.dcm"
    os.link(target, output) if link == "hard link" else output.symlink_to(target)
    before = snapshot(folder)
    status, err = run_segment(capsys, [folder], output, tiny_package)
    assert_refused(status, err, "DICOM series")
    assert snapshot(folder) == before


def test_output_inside_the_input_dicom_folder_is_written(tmp_path, tiny_package, capsys):
    folder = dicom_series(tmp_path / "dicom", ct_like())
    before = snapshot(folder)
    status, err = run_segment(capsys, [folder], folder / "labels.nii.gz", tiny_package)
    assert status == 0, err
    after = snapshot(folder)
    assert set(after) == set(before) | {"labels.nii.gz"}
    assert all(after[name] == data for name, data in before.items())


# ---- D2, D8: a full disk, an unwritable folder, a folder as output -----------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A tiny tmpfs, filled up to the last byte (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        with open(mount / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"x" * 4096)
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_full_disk_gives_one_line_and_leaves_nothing(extension, full_disk, tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    status, err = run_segment(capsys, [scan], full_disk / f"labels{extension}", tiny_package)
    assert_refused(status, err, "could not write")
    assert [p.name for p in full_disk.iterdir()] == ["filler"]


def test_output_that_is_a_folder_is_refused(tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    (tmp_path / "labels.nii.gz").mkdir()
    status, err = run_segment(capsys, [scan], tmp_path / "labels.nii.gz", tiny_package)
    assert_refused(status, err, "is a folder")
    assert list((tmp_path / "labels.nii.gz").iterdir()) == []


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write in: a read-only tmpfs as root (root ignores permission bits)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_output_folder_is_refused_before_inference(read_only_folder, tmp_path, tiny_package,
                                                             capsys, monkeypatch):
    from unetseg_engine.inference import Predictor

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran although the output cannot be written")

    monkeypatch.setattr(Predictor, "predict", no_inference)
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    status, err = run_segment(capsys, [scan], read_only_folder / "labels.nii.gz", tiny_package)
    assert_refused(status, err, "cannot write in the output folder")


# ---- D3, D4, D6, D7: files whose contents do not match their header, or cannot be trusted --------
def nifti_claiming(path: Path, shape, data_bytes: int) -> Path:
    """A NIfTI header that claims ``shape`` int16 voxels, followed by only ``data_bytes`` of noise."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + np.random.default_rng(0).bytes(data_bytes)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def truncated(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def with_value(value: float) -> sitk.Image:
    image = sitk.Cast(ct_like(), sitk.sitkFloat32)
    image[5, 6, 7] = value
    return image


def sheared() -> sitk.Image:
    image = ct_like()
    image.SetDirection([1, 0.5, 0, 0, 1, 0, 0, 0, 1])
    return image


FILE_CASES = {
    # name: (function(tmp_path) -> input path, expected words in the message)
    "first half of a .nii.gz": (lambda t: truncated(write(ct_like(), t / "ct.nii.gz"), 0.5), "truncated"),
    "first 60% of a .nii": (lambda t: truncated(write(ct_like(), t / "ct.nii"), 0.6), "truncated"),
    "1.6 KB .nii.gz claiming 1024^3": (lambda t: nifti_claiming(t / "big.nii.gz", (1024,) * 3, 1200),
                                       "header claims"),
    "2.3 KB .nii claiming 2048x2048x1024": (lambda t: nifti_claiming(t / "big.nii", (2048, 2048, 1024),
                                                                     2000), "header claims"),
    "NaN in a .nii.gz": (lambda t: write(with_value(np.nan), t / "nan.nii.gz"), "NaN"),
    "Inf in a .nii": (lambda t: write(with_value(np.inf), t / "inf.nii"), "NaN or infinite"),
    "sheared direction": (lambda t: write(sheared(), t / "sheared.nrrd"), "orthonormal"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_file_is_refused_before_segmenting(case, tmp_path, tiny_package, capsys):
    make, words = FILE_CASES[case]
    scan = make(tmp_path)
    (tmp_path / "out").mkdir()
    t = time.perf_counter()
    status, err = run_segment(capsys, [scan], tmp_path / "out" / "labels.nii.gz", tiny_package)
    assert_refused(status, err, words)
    assert time.perf_counter() - t < 30
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha"])
def test_volume_larger_than_memory_is_refused(extension, tmp_path, tiny_package, capsys, monkeypatch):
    import psutil

    memory = namedtuple("memory", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(2**20, 2**20))  # 1 MiB free
    scan = write(ct_like((60, 80, 80)), tmp_path / f"ct{extension}")  # 2.3 MB to read and prepare
    status, err = run_segment(capsys, [scan], tmp_path / "labels.nii.gz", tiny_package)
    assert_refused(status, err, "memory")
    assert "80x80x60" in err[0]


def test_sheared_direction_is_refused_by_the_predictor(tiny_package):
    from unetseg_engine.errors import UNetSegError
    from unetseg_engine.inference import Predictor

    predictor = Predictor(device="cpu")
    predictor.load(tiny_package)
    with pytest.raises(UNetSegError, match="orthonormal"):
        predictor.predict([sheared()])


# ---- D19, D20: what the written files look like ---------------------------------------------------
@pytest.mark.parametrize("extension", [".nii.gz", ".seg.nrrd"])
def test_outputs_get_the_umask_permissions(extension, tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    old = os.umask(0o027)
    try:
        status, err = run_segment(capsys, [scan], tmp_path / f"labels{extension}", tiny_package)
    finally:
        os.umask(old)
    assert status == 0, err
    assert stat.S_IMODE((tmp_path / f"labels{extension}").stat().st_mode) == 0o640


def test_mhd_output_is_refused_with_a_hint(tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    (tmp_path / "out").mkdir()
    status, err = run_segment(capsys, [scan], tmp_path / "out" / "labels.mhd", tiny_package)
    assert_refused(status, err, ".mha")
    assert list((tmp_path / "out").iterdir()) == []


# ---- D21: numbers on the command line ------------------------------------------------------------
@pytest.mark.parametrize("option, words", [
    (["--window", "nan,nan"], "finite"), (["--window", "40,inf"], "finite"), (["--window", "40,0"], "width"),
    (["--sw-batch-size", "-3"], "batch"), (["--sw-batch-size", "0"], "batch"),
    (["--overlap", "nan"], "overlap"), (["--overlap", "-0.1"], "overlap"), (["--overlap", "0.99"], "overlap"),
    (["--overlap", "1.5"], "overlap"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_invalid_numbers_are_refused(option, words, tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    status, err = run_segment(capsys, [scan], tmp_path / "labels.nii.gz", tiny_package, *option)
    assert_refused(status, err, words)
    assert not (tmp_path / "labels.nii.gz").exists()


# ---- D22: a scan that does not look like the model's modality --------------------------------------
def mr_like() -> sitk.Image:
    """0 to a few outside, about 800 inside: no air near -1000 as in a CT."""
    ct = ct_like()
    image = sitk.GetImageFromArray((np.abs(sitk.GetArrayFromImage(ct) + 1000.0) * 0.8).astype(np.int16))
    image.CopyInformation(ct)
    return image


def test_ct_model_warns_on_an_mr_like_scan(tmp_path, tiny_package, capsys):
    scan = write(mr_like(), tmp_path / "mr.nrrd")
    status, err = run_segment(capsys, [scan], tmp_path / "labels.nii.gz", tiny_package)
    assert status == 0, err
    warnings = [line for line in err if line.startswith("unetseg: warning: ")]
    assert len(warnings) == 1 and "CT" in warnings[0], err
    assert (tmp_path / "labels.nii.gz").exists()


def test_mr_model_warns_on_a_ct(tmp_path, capsys):
    package = make_package(tmp_path / "tiny-mr", tiny_meta("tiny-mr", modality="MR"))
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    status, err = run_segment(capsys, [scan], tmp_path / "labels.nii.gz", package)
    assert status == 0, err
    assert any(line.startswith("unetseg: warning: ") and "CT" in line for line in err), err


def test_no_warning_on_a_ct_for_a_ct_model(tmp_path, tiny_package, capsys):
    scan = write(ct_like(), tmp_path / "ct.nrrd")
    status, err = run_segment(capsys, [scan], tmp_path / "labels.nii.gz", tiny_package)
    assert status == 0 and not [line for line in err if "warning" in line], err


# ---- D23, D25: checked in a child process (today's failure is a hang or a traceback) --------------
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "unetseg_engine.cli", *args]


def child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO / "SlicerUNetSeg"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _fifo(t: Path) -> Path:
    os.mkfifo(t / "pipe.nii.gz")
    return t / "pipe.nii.gz"


def _dev_zero(t: Path) -> Path:
    (t / "zero.nii.gz").symlink_to("/dev/zero")
    return t / "zero.nii.gz"


@pytest.mark.parametrize("make", [_fifo, _dev_zero], ids=["named pipe", "symlink to /dev/zero"])
def test_non_regular_input_is_refused(make, tmp_path, tiny_package):
    scan = make(tmp_path)
    (tmp_path / "out").mkdir()
    done = subprocess.run(cli("segment", str(scan), "-o", str(tmp_path / "out" / "o.nii.gz"), "--model",
                              str(tiny_package.path), "-q"),
                          capture_output=True, text=True, timeout=120, env=child_env())
    err = done.stderr.strip().splitlines()
    assert_refused(done.returncode, err, "not a regular file")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_second_ctrl_c_during_clean_up_gives_no_traceback(tmp_path, tiny_package):
    scan = write(ct_like((100, 160, 160)), tmp_path / "ct.nrrd")
    (tmp_path / "out").mkdir()
    # the child gets SIGINT's default disposition, as in a terminal: a test run started in the
    # background (``cmd &`` in a script) ignores SIGINT, the child would inherit that, Python then
    # installs no KeyboardInterrupt handler, and the run would finish as if never interrupted
    child = subprocess.Popen(cli("segment", str(scan), "-o", str(tmp_path / "out" / "o.nii.gz"),
                                 "--model", str(tiny_package.path), "--overlap", "0.9"),
                             stderr=subprocess.PIPE, text=True, env=child_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in child.stderr:  # wait until the network is running
        lines.append(line)
        if line.startswith("[inference]"):
            break
    time.sleep(0.1)
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:  # Ctrl-C, and again, and again
        child.send_signal(signal.SIGINT)
        time.sleep(0.01)
    err = "".join(lines) + child.stderr.read()
    child.wait(timeout=30)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert list((tmp_path / "out").iterdir()) == []
