"""requirements-lock.txt is what scripts/venv.sh installs (and so CI, through scripts/test.sh):
every dependency, transitive ones too, by version and hash. It must agree with pyproject.toml's
pins, and this environment must be what it says."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def locked(name: str = "requirements-lock.txt") -> dict[str, tuple[Requirement, list[str]]]:
    """name -> (the pinned requirement with its marker, its hashes)."""
    entries: dict[str, tuple[Requirement, list[str]]] = {}
    text = (ROOT / name).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if not line:
            continue
        spec, *options = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        entries[canonicalize_name(requirement.name)] = (requirement, [o.strip() for o in options])
    return entries


def direct_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    pins = {}
    for spec in specs:
        requirement = Requirement(spec)
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{spec}: pyproject.toml pins its direct dependencies"
        pins[canonicalize_name(requirement.name)] = pin.version
    return pins


def test_every_locked_package_is_pinned_with_hashes() -> None:
    lock = locked()
    assert {"pip", "setuptools", "wheel", "kombu", "click"} <= lock.keys()
    for name, (requirement, hashes) in lock.items():
        (pin,) = requirement.specifier
        assert pin.operator == "==", name
        assert hashes and all(h.startswith("sha256:") for h in hashes), name


def test_the_lock_has_pyprojects_versions() -> None:
    """A dependency changed in pyproject.toml without ./scripts/lock.sh fails here."""
    lock = locked()
    for name, pinned in direct_pins().items():
        assert name in lock, f"{name} is not in requirements-lock.txt: run ./scripts/lock.sh"
        (pin,) = lock[name][0].specifier
        assert pin.version == pinned, f"{name}: lock {pin.version}, pyproject {pinned}"


def test_this_environment_is_the_lock() -> None:
    for name, (requirement, _) in locked().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (pin,) = requirement.specifier
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        assert installed == pin.version, f"{name}: installed {installed}, locked {pin.version}"


def test_the_docker_images_lock_is_the_same_versions_without_dev_tools() -> None:
    lock, deploy = locked(), locked("requirements-deploy.txt")
    assert {"flower", "fastapi", "kombu", "pip"} <= deploy.keys()
    assert not {"mypy", "ruff", "pytest", "hypothesis"} & deploy.keys()
    for name, (requirement, hashes) in deploy.items():
        assert name in lock, name
        assert requirement.specifier == lock[name][0].specifier, name
        assert hashes, name
