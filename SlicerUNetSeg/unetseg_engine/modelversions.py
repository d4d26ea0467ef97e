"""Versions of a model made by ``unetseg finetune``: kept side by side, one active, earlier ones restorable.

Layout, in the user models folder (``modelpkg.user_models_dir()``)::

    _versions/<model id>/<version>/        a complete model package (metadata.json and its weights)
    _versions/<model id>/versions.json     {"active": "1.2.1" or null, "history": [entry, ...]}

``_versions`` cannot be a model id (ids start with a letter or digit) and holds no ``metadata.json``
of its own, so the model listing never takes it for a package. The *base* version of a model is the
package the ordinary search path finds (shipped or imported); it is never copied or changed here.
``active: null`` means the base is in use. ``modelpkg.scan_models`` puts the active version in the
base's place, so ``segment``, ``batch``, ``evaluate``, the worker and the Slicer panel all use it.

Installing is atomic: the package is written to a hidden staging folder beside its final place and
renamed into place complete, and only then does ``versions.json`` (written to a temporary file and
renamed) name it. An interrupted install leaves at most a folder that no record names, which is never
used; nothing half-written is ever listed or loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import UNetSegError

VERSIONS_FOLDER = "_versions"
RECORD_FILE = "versions.json"


def versions_root() -> Path:
    from .modelpkg import user_models_dir

    return user_models_dir() / VERSIONS_FOLDER


def versions_dir(model_id: str) -> Path:
    return versions_root() / model_id


def read_record(model_id: str) -> dict[str, Any]:
    """``{"active": version or None, "history": [...]}``; empty when the model was never fine-tuned."""
    path = versions_dir(model_id) / RECORD_FILE
    if not path.is_file():
        return {"active": None, "history": []}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("history"), list):
            raise ValueError("not a versions record")
    except (OSError, ValueError) as error:
        raise UNetSegError(f"The version record {path} cannot be read ({error}). Remove it to go back to "
                           "the model's base version.") from None
    return record


def _write_record(model_id: str, record: dict[str, Any]) -> None:
    folder = versions_dir(model_id)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RECORD_FILE}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, folder / RECORD_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def active_package(model_id: str):
    """The active fine-tuned version of ``model_id`` as a ModelPackage, or None (the base is active).

    Raises UNetSegError when the record names a version whose package is missing or invalid.
    """
    from .modelpkg import load_package

    active = read_record(model_id).get("active")
    if not active:
        return None
    folder = versions_dir(model_id) / str(active)
    package = load_package(folder)
    if package.id != model_id or package.meta["version"] != active:
        raise UNetSegError(f"{folder} holds model '{package.id}' v{package.meta['version']}, not "
                           f"'{model_id}' v{active} as {RECORD_FILE} says.")
    return package


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def next_version(model_id: str, current: str) -> str:
    """The next patch version after ``current`` that no stored or recorded version already has."""
    taken = {entry.get("version") for entry in read_record(model_id)["history"]}
    folder = versions_dir(model_id)
    if folder.is_dir():
        taken |= {child.name for child in folder.iterdir()}
    major, minor, patch = _version_key(current)
    highest = max([_version_key(v) for v in taken if _is_version(v)] + [(major, minor, patch)])
    if highest[:2] == (major, minor):
        patch = highest[2]
    version = f"{major}.{minor}.{patch + 1}"
    while version in taken:
        patch += 1
        version = f"{major}.{minor}.{patch + 1}"
    return version


def _is_version(text: Any) -> bool:
    parts = str(text).split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


def install_version(candidate, entry: dict[str, Any]):
    """Copy the candidate package (already carrying its new version) into the store and make it active.

    ``entry`` is what the history records about it (parent version, data, evaluation). Returns the
    installed ModelPackage.
    """
    from .modelpkg import METADATA_FILE, load_package, sha256_of

    model_id, version = candidate.id, candidate.meta["version"]
    folder = versions_dir(model_id)
    target = folder / version
    if target.exists():
        raise UNetSegError(f"Version {version} of '{model_id}' already exists at {target}; nothing was "
                           "installed.")
    for weights in candidate.weight_files:
        if sha256_of(candidate.path / weights["file"]) != weights["sha256"]:
            raise UNetSegError(f"The fine-tuned weights {weights['file']} do not match their checksum; "
                               "nothing was installed.")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=folder))
    try:
        for name in [METADATA_FILE] + [w["file"] for w in candidate.weight_files]:
            shutil.copy2(candidate.path / name, staging / name)
        staging.chmod(0o755)  # mkdtemp makes it private
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record = read_record(model_id)
    record["history"].append({**entry, "version": version, "sha256": candidate.weights_key,
                              "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    record["active"] = version
    _write_record(model_id, record)
    return load_package(target)


def list_versions(model_id: str, base_version: str | None) -> list[dict[str, Any]]:
    """Every version of a model, oldest first: the base, then each fine-tuned one, with ``active``."""
    record = read_record(model_id)
    active = record.get("active")
    versions = []
    if base_version is not None:
        versions.append({"version": base_version, "kind": "base", "active": not active})
    for entry in record["history"]:
        versions.append({**entry, "kind": "fine-tuned", "active": entry["version"] == active})
    return versions


def restore_version(model_id: str, version: str | None = None, base_version: str | None = None) -> str:
    """Make an earlier version active: ``version``, or by default the one the active version was
    fine-tuned from. Returns the version now active (``base_version`` when that is the base)."""
    record = read_record(model_id)
    active = record.get("active")
    stored = {entry["version"]: entry for entry in record["history"]}
    if version is None:
        if not active:
            at = f" {base_version}" if base_version else ""
            raise UNetSegError(f"'{model_id}' is at its base version{at}; there is no earlier version "
                               "to restore.")
        version = stored.get(active, {}).get("parent")
    if version is None or version == base_version or version == "base":
        record["active"] = None
        _write_record(model_id, record)
        return base_version or "base"
    if version not in stored:
        known = ", ".join([base_version or "base"] + list(stored))
        raise UNetSegError(f"'{model_id}' has no version {version}; its versions are {known}.")
    from .modelpkg import load_package

    load_package(versions_dir(model_id) / version)  # it must still load (raises, saying why)
    record["active"] = version
    _write_record(model_id, record)
    return version
