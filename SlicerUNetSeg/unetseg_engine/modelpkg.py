"""Model packages: a folder (or a zip of one) holding ``metadata.json`` and the weights.

Models are data. The metadata is validated against ``schema/model.schema.json``; the network is built
from MONAI classes on an allow-list (``networks.py``); the weights are loaded with
``torch.load(weights_only=True)`` only after their SHA-256 matches the metadata. Listing models reads
JSON only and never imports torch. The limits that keep hostile packages harmless are in
``packagecheck.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from .errors import UNetSegError
from .modeldesc import ModelDescription
from .packagecheck import check_archive, check_package_runs, load_weights_file, read_metadata

METADATA_FILE = "metadata.json"
SCHEMA_PATH = Path(__file__).with_name("schema") / "model.schema.json"
DEFAULT_MODEL_ID = "openkbp-hn-oar"


def shipped_models_dir() -> Path:
    """Models that ship with the extension: SlicerUNetSeg/Resources/Models."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def user_models_dir() -> Path:
    """Where ``unetseg import-model`` installs packages (UNETSEG_USER_MODELS overrides)."""
    env = os.environ.get("UNETSEG_USER_MODELS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "unetseg" / "models"


def model_search_path() -> list[Path]:
    """Folders searched for model packages, first match wins: UNETSEG_MODELS_PATH, user, shipped."""
    paths = [Path(p) for p in os.environ.get("UNETSEG_MODELS_PATH", "").split(os.pathsep) if p]
    return paths + [user_models_dir(), shipped_models_dir()]


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_metadata(meta: Any, where: str = "metadata.json") -> None:
    """Raise UNetSegError naming the first problem if ``meta`` does not follow the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        location = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise UNetSegError(f"Model metadata {where} is invalid at '{location}': {error.message}. "
                           "Fix the package or ask its author for a valid one.")
    values = [label["value"] for label in meta["labels"]]
    names = [label["name"] for label in meta["labels"]]
    if len(set(values)) != len(values) or len(set(names)) != len(names):
        raise UNetSegError(f"Model metadata {where} has repeated label values or names.")
    for pair in meta["inference"].get("tta_mirror_pairs", []):
        if any(name not in names for name in pair):
            raise UNetSegError(f"Model metadata {where}: tta_mirror_pairs names {pair}, but the "
                               f"labels are {names}.")
    from .networks import check_patch_fits, validate_network  # import no torch

    net = meta["network"]
    if is_nnunet(meta):
        _validate_nnunet(meta, where)
        return
    if net.get("framework", "monai") != "monai" or net["architecture"] in NNUNET_ARCHITECTURES:
        raise UNetSegError(f"Model metadata {where}: the {net['architecture']} network needs "
                           "framework 'nnunetv2' and an 'nnunet' section (import the nnU-Net folder "
                           "with 'unetseg import-model').")
    validate_network(net["architecture"], net["spatial_dims"], net["params"])
    try:
        check_patch_fits(net["architecture"], net["spatial_dims"], net["params"],
                         meta["inference"]["patch_size"])
    except UNetSegError as error:
        raise UNetSegError(f"Model metadata {where}: {error}") from None


NNUNET_ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")


def is_nnunet(meta: dict[str, Any]) -> bool:
    """Whether a package is an imported nnU-Net model (run with nnU-Net's steps, ``nnunet.py``)."""
    return meta["network"].get("framework") == "nnunetv2"


def _validate_nnunet(meta: dict[str, Any], where: str) -> None:
    from . import nnunet  # imports no torch

    net, section = meta["network"], meta.get("nnunet")
    if section is None:
        raise UNetSegError(f"Model metadata {where} is invalid: framework 'nnunetv2' needs an 'nnunet' "
                           "section.")
    problem = None
    if meta["preprocessing"]["normalization"]["method"] != "nnunet":
        problem = "an nnU-Net model's normalisation method must be 'nnunet'"
    elif meta["output"]["type"] != "multiclass":
        problem = "nnU-Net models give one label per voxel (output type multiclass)"
    elif len(section["normalization_schemes"]) != len(meta["inputs"]) or \
            len(section["intensity_properties"]) != len(meta["inputs"]):
        problem = "the nnunet section must give a normalisation for each input"
    elif len(section["patch_size"]) != net["spatial_dims"]:
        problem = "the nnunet patch_size does not match spatial_dims"
    if problem:
        raise UNetSegError(f"Model metadata {where} is invalid: {problem}.")
    try:
        nnunet.validate_network(net["architecture"], net["spatial_dims"], net["params"])
        nnunet.check_patch_fits(net["params"], section["patch_size"])
    except UNetSegError as error:
        raise UNetSegError(f"Model metadata {where}: {error}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelPackage:
    """A model package on disk: its folder and its metadata (validated by ``load_package``).

    ``desc`` is the metadata as typed dataclasses (``modeldesc.py``), built once, on first use; the
    engine's run path reads that, not ``meta``. ``meta`` stays for listing (which reads packages
    without the schema) and for writing packages.
    """

    path: Path
    meta: dict[str, Any] = field(repr=False)

    @cached_property
    def desc(self) -> ModelDescription:
        return ModelDescription.from_meta(self.meta)

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def labels(self) -> list[dict[str, Any]]:
        return self.meta["labels"]

    @property
    def label_names(self) -> list[str]:
        return [label["name"] for label in self.labels]

    @property
    def multilabel(self) -> bool:
        return self.desc.multilabel

    @property
    def out_channels(self) -> int:
        return self.desc.out_channels

    @property
    def weight_files(self) -> list[dict[str, str]]:
        """``{"file", "sha256"}`` of each weights file: one, or one per ensemble member."""
        weights = self.meta["weights"]
        return weights if isinstance(weights, list) else [weights]

    @property
    def weights_key(self) -> str:
        """Identifies the weights (all members' SHA-256): equal keys mean the same network."""
        return self.desc.weights_key

    @property
    def weights_bytes(self) -> int:
        return sum((self.path / w["file"]).stat().st_size for w in self.weight_files)

    def summary(self) -> dict[str, Any]:
        """What ``unetseg models --json`` and the Slicer model selector show."""
        m = self.meta
        return {
            "id": m["id"], "title": m["title"], "version": m["version"], "modality": m["modality"],
            "description": m["description"], "licence": m["licence"],
            "inputs": [i["name"] for i in m["inputs"]], "labels": self.label_names,
            "default_window": _window_of(m), "performance": m.get("performance", {}).get("summary"),
            "expected_runtime": m.get("expected_runtime"), "path": str(self.path),
            "networks": len(self.weight_files),
        }

    @property
    def files(self) -> list[str]:
        """Every file of the package, relative to its folder (what import-model copies)."""
        desc = self.desc
        return [METADATA_FILE] + [w.file for w in desc.weights] + [f"int8/{f.file}" for f in desc.int8_files]

    def int8_graph(self) -> Path | None:
        """The package's int8 OpenVINO graph (``model.xml``), after checking both its files against
        their SHA-256; None when the package has none (see ``quantize.py``)."""
        entries = self.desc.int8_files
        if not entries:
            return None
        for entry in entries:
            path = self.path / "int8" / entry.file
            if not path.is_file() or sha256_of(path) != entry.sha256:
                raise UNetSegError(f"The int8 graph of model '{self.id}' (int8/{entry.file}) is missing "
                                   "or does not match its checksum; reinstall the model package, or run "
                                   "without --runtime openvino-int8.")
        return self.path / "int8" / "model.xml"

    def load_state_dicts(self) -> list[dict[str, Any]]:
        """Each member's weights (one for a plain model), loaded only after their SHA-256 checks."""
        return [self._load_weights(w) for w in self.weight_files]

    def load_state_dict(self) -> dict[str, Any]:
        """The weights of a single-network model (``--init-from`` takes no ensemble)."""
        if len(self.weight_files) != 1:
            raise UNetSegError(f"Model '{self.id}' is an ensemble of {len(self.weight_files)} "
                               "networks; use one of its members' packages here.")
        return self._load_weights(self.weight_files[0])

    def _load_weights(self, weights: dict[str, str]) -> dict[str, Any]:
        path = self.path / weights["file"]
        if not path.is_file():
            raise UNetSegError(f"Weights file '{path}' of model '{self.id}' is missing; reinstall the "
                               "model package.")
        expected = weights["sha256"]
        actual = sha256_of(path)
        if actual != expected:
            raise UNetSegError(f"Weights file '{path.name}' of model '{self.id}' does not match its "
                               f"checksum (expected {expected[:12]}..., got {actual[:12]}...): it is "
                               "damaged or was tampered with. Reinstall the model package.")
        return load_weights_file(path, self.id)


def _window_of(meta: dict[str, Any]) -> list[float] | None:
    norm = meta["preprocessing"]["normalization"]
    return [norm["level"], norm["width"]] if norm["method"] == "ct_window" else None


def load_package(path: str | os.PathLike, validate: bool = True) -> ModelPackage:
    """Read and validate the package folder at ``path`` (``validate=False``: read it only, to list
    models where jsonschema is not installed yet; validate before use)."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise UNetSegError(f"'{path}' is not a model package: it has no {METADATA_FILE}.")
    meta = read_metadata(meta_path)
    package = ModelPackage(path, meta)
    if validate:
        validate_metadata(meta, str(meta_path))
        package.desc  # noqa: B018 - built once, here, from the metadata just validated
    else:
        try:
            package.summary()
        except (KeyError, TypeError, IndexError) as error:
            raise UNetSegError(f"'{meta_path}' is not a model description ({error!r}).") from None
    return package


def scan_models(versions: bool = True, validate: bool = True
                ) -> tuple[list[ModelPackage], list[tuple[Path, str]]]:
    """Every valid package on the search path (the first of each id wins), and the folders skipped
    with the reason: an invalid package, or a user-folder package claiming a shipped model's id.

    ``versions``: a model with an active fine-tuned version (``modelversions``) is listed as that
    version; False lists the base packages themselves. ``validate=False`` reads the metadata without
    the schema (``load_package``)."""
    found: dict[str, ModelPackage] = {}
    skipped: list[tuple[Path, str]] = []
    reserved = shipped_model_ids(validate)
    for folder in model_search_path():
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            # hidden folders are staging areas of installs in progress (or interrupted): never a model
            if child.name.startswith(".") or not (child / METADATA_FILE).is_file():
                continue
            try:
                package = load_package(child, validate)
            except UNetSegError as error:
                skipped.append((child, str(error)))
                continue
            if folder == user_models_dir() and package.id in reserved:
                skipped.append((child, f"its id '{package.id}' belongs to a shipped model"))
                continue
            found.setdefault(package.id, package)
    if versions:
        from .modelversions import active_package

        for model_id in list(found):
            try:
                version = active_package(model_id)
            except UNetSegError as error:  # the base stays in use, and the listing says why
                skipped.append((found[model_id].path, f"its active fine-tuned version is unusable: {error}"))
                continue
            if version is not None:
                found[model_id] = version
    models = sorted(found.values(), key=lambda p: (p.id != DEFAULT_MODEL_ID, p.id))
    return models, skipped


def base_package(model_id: str) -> ModelPackage | None:
    """The package of ``model_id`` on the search path, whatever fine-tuned version is active."""
    return next((p for p in scan_models(versions=False)[0] if p.id == model_id), None)


def list_models() -> list[ModelPackage]:
    """Every valid package on the search path (invalid ones are skipped); the first id wins."""
    return scan_models()[0]


def shipped_model_ids(validate: bool = True) -> set[str]:
    """Ids of the models that ship with the extension; no user package may take them over."""
    folder = shipped_models_dir()
    ids = set()
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            ids.add(load_package(child, validate).id)
        except UNetSegError:
            continue
    return ids


def get_model(model: str | os.PathLike | None = None) -> ModelPackage:
    """A model by id, or by the path of a package folder; None gives the default model."""
    if model is not None and Path(model).is_dir():
        return load_package(model)
    wanted = model or DEFAULT_MODEL_ID
    for package in list_models():
        if package.id == wanted:
            return package
    known = ", ".join(p.id for p in list_models()) or "none"
    raise UNetSegError(f"Unknown model '{wanted}'. Available models: {known}. Run 'unetseg models' "
                       "to list them, or 'unetseg import-model PACKAGE' to add one.")


def import_model(source: str | os.PathLike, destination: Path | None = None,
                 overwrite: bool = False) -> ModelPackage:
    """Validate a package (folder or .zip), check its weights, and copy it into the user folder."""
    source = Path(source)
    destination = destination or user_models_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file() and zipfile.is_zipfile(source):
            try:
                with zipfile.ZipFile(source) as archive:
                    check_archive(archive, source.name)  # before a single byte is extracted
                    archive.extractall(tmp)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise UNetSegError(f"'{source.name}' is a damaged zip ({error}).") from None
            candidates = [p.parent for p in Path(tmp).rglob(METADATA_FILE)]
            if len(candidates) != 1:
                raise UNetSegError(f"'{source.name}' must hold exactly one {METADATA_FILE}.")
            root = candidates[0]
        elif source.is_dir():
            root = source
        else:
            raise UNetSegError(f"'{source}' is neither a model package folder nor a .zip of one.")
        package = load_package(root)
        if package.id in shipped_model_ids():
            raise UNetSegError(f"'{package.id}' is the id of a model that ships with SlicerUNetSeg; an "
                               "imported package cannot replace it. Give the package a new id in its "
                               f"{METADATA_FILE} and import it again.")
        for weights in package.weight_files:
            path = package.path / weights["file"]
            if not path.is_file() or sha256_of(path) != weights["sha256"]:
                raise UNetSegError(f"The weights of '{package.id}' ({weights['file']}) are missing or "
                                   "do not match the checksum in its metadata; the package is damaged.")
        check_package_runs(package)
        target = destination / package.id
        installed = target.exists() or target.is_symlink()
        if installed and not overwrite:
            raise UNetSegError(f"A model '{package.id}' is already installed at '{target}'. Use "
                               "--overwrite to replace it.")
        destination.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{package.id}.", dir=destination))
        try:
            package.int8_graph()  # checks its files, if it has one
            for name in package.files:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, staging / name)
            replace_with_staged(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return load_package(target)


def publish_staged(staging: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Validate ``meta``, write it into the staged package folder and move that folder to ``folder``
    (which must not exist) in one rename; the caller removes ``staging`` if this raises."""
    validate_metadata(meta, f"metadata for {folder}")
    staging.chmod(0o755)  # mkdtemp makes it private
    (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, folder)


def replace_with_staged(staging: Path, target: Path) -> None:
    """Put a completely written staging folder in place of ``target`` (an installed package, if any):
    a link is replaced, never the folder it points to."""
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def write_package(folder: str | os.PathLike, meta: dict[str, Any], state_dict: dict[str, Any],
                  weights_name: str = "model.pt") -> ModelPackage:
    """Save weights and metadata (with the weights' SHA-256 filled in) as a validated package."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / weights_name
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, weights)
    meta = dict(meta, weights={"file": weights_name, "sha256": sha256_of(weights)})
    validate_metadata(meta, f"metadata for {folder}")
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return load_package(folder)


# What every member of an ensemble must share, so that their probabilities can be averaged.
ENSEMBLE_SHARED = ("modality", "inputs", "network", "preprocessing", "output", "labels")


def write_ensemble(folder: str | os.PathLike, members: list[ModelPackage], model_id: str,
                   version: str = "1.0.0", title: str | None = None, half: bool = False) -> ModelPackage:
    """A package whose class probabilities are the mean of ``members``' (nnU-Net-style ensembling).

    Every member must have the same network description, preprocessing, inputs, labels and output
    type; inference settings, postprocessing and colours come from the first. ``half`` stores the
    weights as float16 (half the size; the networks still run in float32). The folder must not
    exist: it is written under a temporary name and renamed when complete. Its measured performance
    is left out until ``unetseg evaluate --write-performance`` measures the ensemble itself.
    """
    import torch

    folder = Path(folder)
    if len(members) < 2:
        raise UNetSegError("An ensemble needs at least two models.")
    if folder.exists():
        raise UNetSegError(f"'{folder}' already exists; choose a new folder for the ensemble.")
    first = members[0]
    for other in members[1:]:
        for key in ENSEMBLE_SHARED:
            if other.meta[key] != first.meta[key]:
                raise UNetSegError(f"Models '{first.id}' and '{other.id}' differ in '{key}'; only "
                                   "models trained with the same plan and labels can be ensembled.")
    meta = {k: v for k, v in first.meta.items() if k not in ("weights", "performance", "training",
                                                            "expected_runtime")}
    meta.update(id=model_id, version=version, title=title or f"{first.meta['title']} (ensemble)")
    meta["description"] = (f"{first.meta['description']} Ensemble of {len(members)} networks whose "
                           "class probabilities are averaged.")
    trainings = [m.meta.get("training", {}) for m in members]
    seen = sorted({name for t in trainings for name in t.get("train_cases", [])})
    unseen = [name for name in trainings[0].get("validation_cases", [])
              if name not in seen and all(name in t.get("validation_cases", []) for t in trainings)]
    meta["training"] = {"train_cases": seen, "validation_cases": unseen, "ensemble_of": [
        {"id": m.id, "version": m.meta["version"], "sha256": m.weights_key,
         "time_s": m.meta.get("training", {}).get("time_s"),
         "validation_dice_model_grid": m.meta.get("training", {}).get("validation_dice_model_grid"),
         "performance": m.meta.get("performance", {}).get("summary")} for m in members],
        "weights_dtype": "float16" if half else "float32"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files = []
        for index, state in enumerate(s for m in members for s in m.load_state_dicts()):
            path = staging / f"member{index + 1}.pt"
            torch.save({k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
                        .contiguous() for k, v in state.items()}, path)
            files.append({"file": path.name, "sha256": sha256_of(path)})
        meta["weights"] = files
        publish_staged(staging, folder, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_package(folder)

