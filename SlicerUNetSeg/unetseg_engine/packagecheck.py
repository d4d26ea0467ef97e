"""Defences for model packages from strangers: bounded metadata, bounded zips, weights that load.

A package is untrusted input. Everything here turns a hostile or broken file into one UNetSegError
that says what is wrong, before the file can cost minutes, gigabytes or a traceback:

- ``metadata.json`` is refused above ``MAX_METADATA_BYTES`` before it is parsed (an 88 MB file took
  42-56 s on every command that lists models) and above ``MAX_JSON_DEPTH`` levels of nesting (Python's
  parsers and validators recurse);
- a zip is refused on its directory alone (entry count, total and per-entry uncompressed size,
  compression ratio) before one byte is extracted;
- weights load with ``torch.load(weights_only=True)``; a file that is not plain tensors is reported in
  our words (PyTorch's own message suggests ``weights_only=False``, which would run the file's code);
- at import, the network the metadata describes is built, the weights must fit it exactly, and one
  window of the model's patch size must pass through it.

Reading metadata imports no torch (listing models must not).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from .errors import UNetSegError

MAX_METADATA_BYTES = 1_000_000  # a real metadata.json is under 20 kB, performance records included
MAX_JSON_DEPTH = 32  # real metadata nests about 6 levels deep

# A zipped package holds metadata.json and one weights file per network (the shipped ensemble: 3
# files, 19 MB). The limits leave room for big ensembles and stop zip bombs.
MAX_ZIP_ENTRIES = 64
MAX_ZIP_BYTES = 4 * 1024**3  # total uncompressed size
MAX_ZIP_RATIO = 50  # uncompressed / compressed, per entry; weights barely compress (about 1.1)
RATIO_CHECK_FROM = 1024**2  # small files (the metadata) may compress well; they cannot be bombs


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def read_metadata(meta_path: Path) -> Any:
    """Parse ``metadata.json`` within the size and nesting limits."""
    size = meta_path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise UNetSegError(f"{meta_path} is {size / 1e6:.1f} MB; model metadata is limited to "
                           f"{MAX_METADATA_BYTES / 1e6:g} MB. This is not a model package's metadata.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UNetSegError(f"{meta_path} is not valid JSON ({error}).") from None
    except RecursionError:  # nested deeper than the parser goes
        too_deep = True
    else:
        too_deep = json_depth(meta) > MAX_JSON_DEPTH
    if too_deep:
        raise UNetSegError(f"{meta_path} is nested more than {MAX_JSON_DEPTH} levels deep; model "
                           "metadata is not. This is not a model package's metadata.")
    return meta


def check_archive(archive: zipfile.ZipFile, name: str) -> None:
    """Refuse a zip whose directory says it is unsafe or too big to extract, before extracting it.

    Python's zipfile stops each entry at its declared size, so the directory's sizes bound what
    extraction writes.
    """
    entries = archive.infolist()
    if len(entries) > MAX_ZIP_ENTRIES:
        raise UNetSegError(f"'{name}' has {len(entries)} entries; a model package zip may have at most "
                           f"{MAX_ZIP_ENTRIES} (the metadata and the weights).")
    total = sum(e.file_size for e in entries)
    if total > MAX_ZIP_BYTES:
        raise UNetSegError(f"'{name}' would unpack to {total / 1e9:.1f} GB; a model package may unpack "
                           f"to at most {MAX_ZIP_BYTES / 1e9:.1f} GB.")
    for entry in entries:
        if entry.filename.startswith("/") or ".." in Path(entry.filename).parts:
            raise UNetSegError(f"'{name}' has an unsafe path '{entry.filename}'.")
        ratio = entry.file_size / max(entry.compress_size, 1)
        if entry.file_size > RATIO_CHECK_FROM and ratio > MAX_ZIP_RATIO:
            raise UNetSegError(f"'{name}': entry '{entry.filename}' unpacks {ratio:.0f} times larger than "
                               f"it is stored (at most {MAX_ZIP_RATIO} allowed); it is not model "
                               "weights. Refusing a possible zip bomb.")


def load_weights_file(path: Path, model_id: str) -> dict[str, Any]:
    """A state dict of plain tensors, loaded without running any code from the file."""
    import torch

    problem = None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling a stranger's bytes can raise anything
        # PyTorch's own text recommends weights_only=False, which would run the file's code: say
        # what happened in our words instead.
        problem = (f"could not be loaded as plain tensors ({type(error).__name__}): it is damaged, is "
                   "not a PyTorch weights file, or holds other objects, which may try to run code. "
                   "Nothing in it was run")
    else:
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            problem = "is not a state dict (a mapping of parameter names to tensors)"
    if problem:
        raise UNetSegError(f"Weights file '{path.name}' of model '{model_id}' {problem}. Ask the "
                           "package's author for a valid one.")
    return state


def build_loaded_networks(package) -> list:
    """Each member's network built from the metadata with its weights loaded (exact fit)."""
    from .networks import build_network

    net = package.meta["network"]
    cores = []
    for state in package.load_state_dicts():
        try:
            if net.get("framework") == "nnunetv2":
                from .nnunet import build_network as build_nnunet

                core = build_nnunet(net, len(package.meta["inputs"]), package.out_channels)
            else:
                core = build_network(net["architecture"], net["spatial_dims"],
                                     len(package.meta["inputs"]), package.out_channels, net["params"])
        except (ValueError, TypeError, AssertionError, RuntimeError) as error:
            raise UNetSegError(f"The network of model '{package.id}' cannot be built from its "
                               f"metadata ({str(error).splitlines()[0][:160]}).") from None
        try:
            core.load_state_dict(state)  # strict: every key, every shape; float16 becomes float32
        except RuntimeError as error:
            raise UNetSegError(f"The weights of model '{package.id}' do not fit its network "
                               f"description ({str(error).splitlines()[0][:200]}).") from None
        cores.append(core)
    return cores


def check_package_runs(package) -> None:
    """What ``import-model`` proves before installing: weights load and fit, and one window passes."""
    import torch

    from .networks import volume_network

    net = package.meta["network"]
    patch_zyx = list(reversed(package.meta["inference"]["patch_size"]))
    if net.get("framework") == "nnunetv2":  # the network takes nnU-Net's (transposed) axis order
        patch_zyx = list(package.meta["nnunet"]["patch_size"])
    window = torch.zeros(1, len(package.meta["inputs"]), *patch_zyx)
    for core in build_loaded_networks(package)[:1]:  # members share the network description
        try:
            with torch.inference_mode():
                volume_network(core.eval(), net["spatial_dims"])(window)
        except (RuntimeError, ValueError) as error:
            raise UNetSegError(f"The network of model '{package.id}' cannot run on its patch size "
                               f"{package.meta['inference']['patch_size']} "
                               f"({str(error).splitlines()[0][:160]}).") from None
