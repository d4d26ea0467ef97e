"""Python dependencies of the engine, checked when the user first presses Segment (never at import).

PyTorch comes through Slicer's PyTorch extension (``PyTorchUtils``), which picks the build that
matches the computer's GPU driver; the rest (MONAI and the engine's smaller needs) through pip, after
the user has agreed. Checks read package metadata only: nothing heavy is imported into Slicer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import subprocess
from collections.abc import Callable

# With torch 2.2 to 2.4.0 pip can only choose monai 1.4.0, which requires numpy < 2 and would
# downgrade the numpy 2 that Slicer 5.10 ships; from 2.4.1 on it picks a MONAI that takes numpy 2.
MINIMUM_TORCH = "2.4.1"
# What the worker imports besides torch and SimpleITK, with the bounds of pyproject.toml (the command
# line's list; Testing/test_requirements.py checks the two agree). psutil: the worker checks free memory
# before reading the input; dynamic-network-architectures builds the networks of imported nnU-Net models
# (pure Python, on torch and numpy only).
REQUIREMENTS = ["monai>=1.4", "scipy>=1.10", "jsonschema>=4.18", "numpy>=1.24", "psutil>=5.9",
                "dynamic-network-architectures>=0.3"]
# pyproject.toml's other runtime dependencies, and why the module does not install them.
NOT_INSTALLED = {
    "torch": "comes through Slicer's PyTorch extension (MINIMUM_TORCH)",
    # a requirement above the bundled build (2.5.2 in 5.10, 2.2.1 in 5.6) would make pip replace it
    "simpleitk": "Slicer bundles its own build",
    "slicerio": ".seg.nrrd files of the command line; the module builds segments in the scene",
    "matplotlib": "training curves and benchmark plots of the command line",
    "nibabel": "checks of NIfTI inputs; the module gives the worker NRRD",
    "pydicom": "DICOM SEG output of the command line",
    "highdicom": "DICOM SEG output of the command line",
}


class DependencyError(RuntimeError):
    """Installation is impossible or failed; the message says what to do, ``details`` has pip's output."""

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details


def _processDetails(error: subprocess.CalledProcessError) -> str:
    output = [str(part) for part in (error.output, error.stderr) if part]
    return "\n".join([f"{error}"] + output)[-4000:]


def testingMode() -> bool:
    """Slicer runs with --testing (the self-test, the Extensions Index): install without asking."""
    try:
        import slicer

        return bool(slicer.app.commandOptions().testingEnabled)
    except (ImportError, AttributeError):
        return False
# The fast CPU runtime the worker picks when it is there (measured ~2x PyTorch on 2 cores), and onnx
# for PyTorch's exporter of the graph it runs. Optional: without them the worker runs on PyTorch.
FAST_REQUIREMENTS = ["openvino>=2024.4", "onnx>=1.16"]


def _versionTuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def isSatisfied(requirement: str) -> bool:
    name, _, minimum = requirement.partition(">=")
    version = installedVersion(name)
    return version is not None and (not minimum or _versionTuple(version) >= _versionTuple(minimum))


def torchStatus() -> tuple[str | None, str | None]:
    """(torch version, CUDA version of its build) without importing torch (reads its version file)."""
    version = installedVersion("torch")
    if version is None:
        return None, None
    cuda = None
    spec = importlib.util.find_spec("torch")
    if spec and spec.submodule_search_locations:
        from pathlib import Path

        versionFile = Path(list(spec.submodule_search_locations)[0]) / "version.py"
        if versionFile.is_file():
            for line in versionFile.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("cuda"):
                    value = line.split("=", 1)[1].split("#")[0].strip().strip("'\"")
                    cuda = None if value in ("None", "") else value
    return version, cuda


def missingFastRequirements() -> list[str]:
    """The optional fast CPU runtime's packages that are missing (offered, never required)."""
    return _missing(FAST_REQUIREMENTS)


def missingRequirements() -> list[str]:
    """The engine's required packages that are missing."""
    return _missing(REQUIREMENTS)


def _missing(requirements: list[str]) -> list[str]:
    return [r for r in requirements if not isSatisfied(r)]


# The user said no to the optional runtime: not asked again in this Slicer session.
_declined: set[str] = set()


def ensureDependencies(confirm: Callable[[str], bool], log: Callable[[str], None] = logging.info) -> bool:
    """Make torch and the engine's packages available; False if the user declined.

    ``confirm(message)`` asks the user (the panel shows a dialog; scripts may pass ``lambda m: True``);
    in Slicer's testing mode nothing is asked. Raises DependencyError (a RuntimeError) with a message
    that says what to do when installation is impossible or fails.
    """
    ask = (lambda message: True) if testingMode() else confirm
    version, _ = torchStatus()
    if version is None or _versionTuple(version) < _versionTuple(MINIMUM_TORCH):
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
        except ModuleNotFoundError:
            raise DependencyError("This module needs the PyTorch extension. Install 'PyTorch' from the "
                                  "Extensions Manager, restart Slicer, and press Segment again.") from None
        if version is not None:
            raise DependencyError(
                f"PyTorch {version} is installed but SlicerUNetSeg needs {MINIMUM_TORCH} or newer. Open "
                "the PyTorch Utils module, uninstall PyTorch, restart Slicer and press Segment again to "
                "install a current version.")
        log("PyTorch is not installed; installing it through the PyTorch extension...")
        try:
            # PyTorchUtils asks for confirmation itself, except in testing mode
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH}")
        except (subprocess.CalledProcessError, OSError) as error:
            raise DependencyError(
                "Installing PyTorch failed. Check the network connection, then try again, or install it "
                "from the PyTorch Utils module.", _processDetails(error) if isinstance(
                    error, subprocess.CalledProcessError) else str(error)) from None
        if installed is None:
            return False
    missing = missingRequirements()
    fast = [r for r in missingFastRequirements() if r not in _declined]
    if missing or fast:
        message = ("SlicerUNetSeg needs these Python packages: " + ", ".join(missing) + ".\n"
                   if missing else "")
        if fast:
            message += ("For about twice faster segmentation on the CPU it also installs: "
                        + ", ".join(fast) + " (OpenVINO; optional, PyTorch is used without it).\n")
        if not ask(message + "Install them now? This needs a network connection and can take a "
                       "few minutes."):
            _declined.update(fast)
            return not missing  # declining only the optional runtime still segments, on PyTorch
        import slicer

        log("Installing " + ", ".join(missing + fast) + "...")
        # torch comes from the PyTorch extension (the right CUDA/CPU build): pin it, so that pip picks
        # package versions that fit it instead of replacing it with another build from PyPI
        torchVersion, _ = torchStatus()
        pin = [f"torch=={torchVersion}"] if torchVersion else []
        if missing:
            try:
                slicer.util.pip_install(missing + pin)
            except (subprocess.CalledProcessError, OSError) as error:
                raise DependencyError(
                    "Could not install " + ", ".join(missing) + " (pip failed). Check the network "
                    "connection, or install them from the Python console with slicer.util.pip_install.",
                    _processDetails(error) if isinstance(error, subprocess.CalledProcessError) else str(error)
                ) from None
        if fast:
            try:  # optional: no wheel for this platform must not stop segmentation
                slicer.util.pip_install(fast + pin)
            except (subprocess.CalledProcessError, OSError) as error:
                log(f"Could not install {', '.join(fast)} ({error}); segmenting with PyTorch.")
        still = missingRequirements()
        if still:
            raise DependencyError("Could not install " + ", ".join(still) + ". Check the network "
                                  "connection, or install them from the Python console with "
                                  "slicer.util.pip_install.")
    return True
