"""Hostile or broken model packages: one clear error line, exit status 2, nothing installed.

Every package here is built in the test from the small real package of ``conftest.py``; none needs the
shared data.
"""

import hashlib
import json
import os
import shutil
import zipfile

import pytest

from helpers import refused
from unetseg_engine.cli import main
from unetseg_engine.modelpkg import get_model, shipped_models_dir, validate_metadata


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    """The user model folder, in tmp_path; nothing else on the search path but the shipped models."""
    monkeypatch.setenv("UNETSEG_USER_MODELS", str(tmp_path / "user"))
    monkeypatch.delenv("UNETSEG_MODELS_PATH", raising=False)
    return tmp_path / "user"


def copy_package(tiny_package, folder, edit=None):
    """A copy of the tiny package, its metadata changed by ``edit(meta)``."""
    shutil.copytree(tiny_package.path, folder)
    meta = json.loads((folder / "metadata.json").read_text())
    if edit:
        edit(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def with_weights(folder, data: bytes, name: str = "model.pt"):
    """Replace the weights with ``data``, and fill in their SHA-256 so that the checksum passes."""
    (folder / "model.pt").unlink()
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["weights"] = {"file": name, "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


# ---- D9: weights that are not plain tensors, or do not fit the network ------------------------------

def _malicious_weights(tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"model.0.conv.weight": Payload()}, path)
    return path.read_bytes()


def _other_network_weights(tmp_path):
    import torch

    from unetseg_engine.networks import build_network

    net = build_network("UNet", 3, 1, 4, {"channels": [8, 16, 32], "strides": [2, 2]})
    torch.save(net.state_dict(), tmp_path / "other.pt")
    return (tmp_path / "other.pt").read_bytes()


WEIGHTS = {
    "malicious pickle": (_malicious_weights, "Nothing in it was run"),
    "garbage bytes": (lambda t: os.urandom(4096), "could not be loaded as plain tensors"),
    "weights of another network": (_other_network_weights, "do not fit"),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_import_load_checks_weights_without_suggesting_unsafe_loading(case, tiny_package, user_dir,
                                                                      tmp_path, capsys):
    make, words = WEIGHTS[case]
    package = with_weights(copy_package(tiny_package, tmp_path / "pkg"), make(tmp_path))
    line = refused(capsys, ["import-model", str(package)], words)
    assert "weights_only" not in line
    assert not (user_dir / "tiny-test").exists()
    assert not (tmp_path / "pwned").exists()


def test_segment_with_malicious_weights_gives_our_message(tiny_package, tmp_path):
    from unetseg_engine.errors import UNetSegError

    package = with_weights(copy_package(tiny_package, tmp_path / "pkg"), _malicious_weights(tmp_path))
    with pytest.raises(UNetSegError, match="Nothing in it was run") as error:
        get_model(package).load_state_dicts()
    assert "weights_only" not in str(error.value)
    assert not (tmp_path / "pwned").exists()


# ---- D10: .safetensors weights are not accepted (they could never load) -----------------------------

def test_safetensors_weights_are_refused_by_the_schema(tiny_package, user_dir, tmp_path, capsys):
    package = copy_package(tiny_package, tmp_path / "pkg")
    with_weights(package, (package / "model.pt").read_bytes(), name="model.safetensors")
    refused(capsys, ["import-model", str(package)], "invalid at 'weights'")
    assert not (user_dir / "tiny-test").exists()


# ---- D11: sanity bounds on what the metadata may ask for ---------------------------------------------

def _set(path, value):
    def edit(meta):
        *parents, last = path.split("/")
        node = meta
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return edit


BOUNDS = {
    "overlap 0.999999": (_set("inference/overlap", 0.999999), "inference/overlap"),
    "patch of one voxel": (_set("inference/patch_size", [1, 1, 1]), "does not fit"),
    "patch not a multiple of the strides": (_set("inference/patch_size", [33, 32, 16]), "does not fit"),
    "huge patch": (_set("inference/patch_size", [100000, 32, 16]), "inference/patch_size/0"),
    "huge windows per batch": (_set("inference/sw_batch_size", 100000), "inference/sw_batch_size"),
    "tiny spacing": (_set("preprocessing/spacing_mm", [1e-4, 1e-4, 1e-4]), "preprocessing/spacing_mm/0"),
    "huge spacing": (_set("preprocessing/spacing_mm", [6.0, 1000.0, 6.0]), "preprocessing/spacing_mm/1"),
    "huge channel count": (_set("network/params/channels", [4, 8, 10**7]), "network/params/channels/2"),
    "deep network": (_set("network/params/channels", [4] * 40), "network/params/channels"),
    "huge kernel": (_set("network/params/kernel_size", 99), "network/params/kernel_size"),
    "huge stride": (_set("network/params/strides", [2, 64]), "network/params/strides/1"),
    "too many inputs": (_set("inputs", [{"name": f"c{i}"} for i in range(100)]), "'inputs'"),
    "CT level out of range": (_set("preprocessing/normalization/level", 1e6),
                              "preprocessing/normalization/level"),
    "CT width below 1 HU": (_set("preprocessing/normalization/width", 1e-6),
                            "preprocessing/normalization/width"),
    "CT width over 8000 HU": (_set("preprocessing/normalization/width", 9000),
                              "preprocessing/normalization/width"),
}


@pytest.mark.parametrize("case", list(BOUNDS))
def test_import_refuses_metadata_outside_sanity_bounds(case, tiny_package, user_dir, tmp_path, capsys):
    edit, words = BOUNDS[case]
    package = copy_package(tiny_package, tmp_path / "pkg", edit)
    refused(capsys, ["import-model", str(package)], words)
    assert not (user_dir / "tiny-test").exists()


@pytest.mark.parametrize("level,width", [(-3000, 1), (3000, 8000), (40, 400)])
def test_ct_window_bounds_match_the_slicer_panel(level, width, tiny_package):
    meta = json.loads(json.dumps(tiny_package.meta))
    meta["preprocessing"]["normalization"].update(level=level, width=width)
    validate_metadata(meta)


def test_shipped_models_are_within_the_bounds():
    folders = [p for p in shipped_models_dir().iterdir() if (p / "metadata.json").is_file()] \
        if shipped_models_dir().is_dir() else []
    if not folders:
        pytest.skip("no shipped models in SlicerUNetSeg/Resources/Models")
    for folder in folders:
        validate_metadata(json.loads((folder / "metadata.json").read_text()), str(folder))


# ---- D12: a shipped model's id cannot be taken over ---------------------------------------------------

def test_import_refuses_the_id_of_a_shipped_model(tiny_package, user_dir, tmp_path, capsys):
    if not (shipped_models_dir() / "openkbp-hn-oar" / "metadata.json").is_file():
        pytest.skip("the shipped default model is not in SlicerUNetSeg/Resources/Models")
    package = copy_package(tiny_package, tmp_path / "pkg", _set("id", "openkbp-hn-oar"))
    refused(capsys, ["import-model", str(package)], "openkbp-hn-oar", "new id")
    assert not (user_dir / "openkbp-hn-oar").exists()
    # one installed before this rule existed does not shadow the shipped model either
    copy_package(tiny_package, user_dir / "openkbp-hn-oar", _set("id", "openkbp-hn-oar"))
    assert get_model("openkbp-hn-oar").path == shipped_models_dir() / "openkbp-hn-oar"


# ---- D13: deeply nested metadata -----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [100, 100000])
def test_deeply_nested_metadata_is_refused_clearly(depth, tiny_package, user_dir, tmp_path, capsys):
    package = copy_package(tiny_package, tmp_path / "pkg")
    text = (package / "metadata.json").read_text()
    nested = "[" * depth + "]" * depth
    (package / "metadata.json").write_text(text[:-1] + f', "performance": {{"x": {nested}}}}}')
    refused(capsys, ["import-model", str(package)], "nested")
    assert not (user_dir / "tiny-test").exists()


def test_deeply_nested_network_parameters_are_refused(tiny_package, user_dir, tmp_path, capsys):
    nested = "[" * 900 + "]" * 900
    package = copy_package(tiny_package, tmp_path / "pkg")
    meta = (package / "metadata.json").read_text().replace('"num_res_units": 0',
                                                           f'"num_res_units": 0, "act": {nested}')
    (package / "metadata.json").write_text(meta)
    refused(capsys, ["import-model", str(package)], "nested")


# ---- D14: zip bombs are refused from the zip's directory ---------------------------------------------

def _zip(tiny_package, path, extra):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in tiny_package.path.iterdir():
            z.write(f, f"tiny-test/{f.name}")
        extra(z)
    return path


ZIPS = {
    "ten thousand entries": (lambda z: [z.writestr(f"tiny-test/pad/{i}", b"") for i in range(10000)],
                             "entries"),
    "one entry that inflates 1000-fold": (lambda z: z.writestr("tiny-test/pad.bin", bytes(50_000_000)),
                                          "zip bomb"),
    "an entry that climbs out (zip slip)": (lambda z: z.writestr("tiny-test/../../evil.py", b"x"),
                                            "unsafe path"),
    "an absolute entry": (lambda z: z.writestr("/tmp/evil.py", b"x"), "unsafe path"),
}


@pytest.mark.parametrize("case", list(ZIPS))
def test_zip_bombs_are_refused_before_extraction(case, tiny_package, user_dir, tmp_path, capsys,
                                                 monkeypatch):
    extra, words = ZIPS[case]
    archive = _zip(tiny_package, tmp_path / "bomb.zip", extra)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", _no_extraction)
    refused(capsys, ["import-model", str(archive)], words)
    assert not (user_dir / "tiny-test").exists()


def test_zip_unpacking_to_more_than_the_total_limit_is_refused(tiny_package, user_dir, tmp_path, capsys,
                                                               monkeypatch):
    import unetseg_engine.packagecheck as packagecheck

    archive = _zip(tiny_package, tmp_path / "big.zip", lambda z: z.writestr("tiny-test/x", os.urandom(4096)))
    monkeypatch.setattr(packagecheck, "MAX_ZIP_BYTES", 4096)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", _no_extraction)
    refused(capsys, ["import-model", str(archive)], "unpack to", "at most")


def _no_extraction(*args, **kwargs):
    raise AssertionError("extracted before the zip's directory was checked")


# ---- D24: --overwrite onto a symlinked install ----------------------------------------------------------

def test_overwrite_replaces_a_symlinked_install_and_keeps_its_target(tiny_package, user_dir, tmp_path,
                                                                     capsys):
    elsewhere = copy_package(tiny_package, tmp_path / "elsewhere" / "tiny-test")
    user_dir.mkdir()
    (user_dir / "tiny-test").symlink_to(elsewhere, target_is_directory=True)
    refused(capsys, ["import-model", str(tiny_package.path)], "already installed")
    assert main(["import-model", str(tiny_package.path), "--overwrite"]) == 0
    assert not (user_dir / "tiny-test").is_symlink()
    assert (user_dir / "tiny-test" / "model.pt").is_file()
    assert (elsewhere / "model.pt").is_file()  # the folder the link pointed to is left alone


# ---- D26: skipped packages are listed with the reason, and huge metadata is not parsed ---------------

def test_models_lists_skipped_packages_with_the_reason(tiny_package, tmp_path, monkeypatch, capsys):
    search = tmp_path / "search"
    copy_package(tiny_package, search / "good")
    copy_package(tiny_package, search / "bad", _set("network/architecture", "os.system"))
    copy_package(tiny_package, search / "huge", lambda m: m.update(id="huge", description="x" * 2_000_000))
    monkeypatch.setenv("UNETSEG_MODELS_PATH", str(search))
    monkeypatch.setenv("UNETSEG_USER_MODELS", str(tmp_path / "user"))
    assert main(["models", "--json"]) == 0
    captured = capsys.readouterr()
    ids = [m["id"] for m in json.loads(captured.out)]
    assert "tiny-test" in ids and "huge" not in ids
    skipped = [line for line in captured.err.splitlines() if line.startswith("unetseg: skipped")]
    assert len(skipped) == 2
    assert any(str(search / "bad") in line and "architecture" in line for line in skipped)
    assert any(str(search / "huge") in line and "limited to 1 MB" in line for line in skipped)
