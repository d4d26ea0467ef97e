"""One list of Python requirements: the Slicer module's install lists (``dependencies.py``) agree with
pyproject.toml, which the command line installs from."""

import tomllib
from packaging.requirements import Requirement

from helpers import REPO
from SlicerUNetSegLib import dependencies


def requirements(items) -> dict[str, Requirement]:
    return {Requirement(item).name.lower(): Requirement(item) for item in items}


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_modules_requirements_are_pyprojects_with_the_same_bounds():
    runtime = requirements(PROJECT["dependencies"])
    module = requirements(dependencies.REQUIREMENTS)
    for name, requirement in module.items():
        assert name in runtime, f"{name} is installed by the module but not in pyproject.toml"
        assert requirement.specifier == runtime[name].specifier, (name, str(requirement), str(runtime[name]))
    left_out = set(runtime) - set(module)
    assert left_out == set(dependencies.NOT_INSTALLED), \
        f"pyproject.toml runtime dependencies neither installed by the module nor explained: " \
        f"{sorted(left_out ^ set(dependencies.NOT_INSTALLED))}"


def test_the_modules_fast_runtime_requirements_are_pyprojects_fast_extra():
    fast = requirements(PROJECT["optional-dependencies"]["fast"])
    for name, requirement in requirements(dependencies.FAST_REQUIREMENTS).items():
        assert name in fast and requirement.specifier == fast[name].specifier, (name, str(requirement))


def test_the_minimum_pytorch_is_pyprojects():
    assert requirements(PROJECT["dependencies"])["torch"].specifier.contains(dependencies.MINIMUM_TORCH)
    assert not requirements(PROJECT["dependencies"])["torch"].specifier.contains("2.4.0")
