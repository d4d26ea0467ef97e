"""Model packages: listing (as text and JSON), import from a folder or zip, refusal of bad ones."""

import json
import shutil
import zipfile

import pytest

from unetseg_engine.cli import main
from unetseg_engine.errors import UNetSegError
from unetseg_engine.modelpkg import get_model, import_model, list_models


@pytest.fixture()
def model_dirs(tmp_path, monkeypatch, tiny_package):
    monkeypatch.setenv("UNETSEG_MODELS_PATH", str(tiny_package.path.parent))
    monkeypatch.setenv("UNETSEG_USER_MODELS", str(tmp_path / "user"))
    return tmp_path


def test_models_json_lists_id_title_modality_version_labels_licence(model_dirs, capsys):
    assert main(["models", "--json"]) == 0
    models = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    tiny = models["tiny-test"]
    assert tiny["labels"] == ["Structure1", "Structure2", "Structure3"]
    assert (tiny["modality"], tiny["version"], tiny["licence"]) == ("CT", "0.0.1", "Apache-2.0")
    assert tiny["default_window"] == [40, 40 * 10]


def test_import_from_zip_installs_and_refuses_to_overwrite(model_dirs, tiny_package, tmp_path):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in tiny_package.path.iterdir():
            z.write(f, f"tiny-test/{f.name}")
    installed = import_model(archive)
    assert installed.path == tmp_path / "user" / "tiny-test"
    assert installed.load_state_dict()  # checksum verified, weights load
    with pytest.raises(UNetSegError, match="already installed"):
        import_model(archive)
    assert import_model(archive, overwrite=True).id == "tiny-test"


def test_import_refuses_a_package_with_tampered_weights(model_dirs, tiny_package, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_package.path, copy)
    with open(copy / "model.pt", "ab") as f:
        f.write(b"\0")
    assert main(["import-model", str(copy)]) == 2
    assert "damaged" in capsys.readouterr().err
    assert not (tmp_path / "user" / "tiny-test").exists()


def test_network_parameters_outside_the_allow_list_are_refused(model_dirs, tiny_package, tmp_path):
    copy = tmp_path / "evil"
    shutil.copytree(tiny_package.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["network"]["params"]["act"] = {"__import__": "os"}
    meta["network"]["params"]["on_load"] = "__import__('os').system('echo pwned')"
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UNetSegError, match="not accepted"):
        get_model(copy)


def test_mirror_pairs_must_name_the_model_labels(model_dirs, tiny_package, tmp_path):
    copy = tmp_path / "mirrored"
    shutil.copytree(tiny_package.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["inference"]["tta_mirror_pairs"] = [["Structure1", "LeftKidney"]]
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UNetSegError, match="tta_mirror_pairs names"):
        get_model(copy)


def test_default_model_is_listed_first_when_shipped():
    ids = [m.id for m in list_models()]
    if "openkbp-hn-oar" not in ids:
        pytest.skip("the shipped default model is not in SlicerUNetSeg/Resources/Models yet")
    assert ids[0] == "openkbp-hn-oar"
