"""The installed packages against the set CI tested (constraints.txt), native ones first.

A package with compiled code (llama.cpp, onnxruntime, torch, ...) that differs from the tested
release can crash the process outright instead of raising an error, so ``facecast doctor`` names
each one that differs before it loads any engine.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from engines import PROJECT_ROOT

CONSTRAINTS_FILE = PROJECT_ROOT / "constraints.txt"
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")


@dataclass(frozen=True)
class Dependency:
    name: str
    installed: str
    tested: str | None  # None: not in the tested set at all

    @property
    def is_tested(self) -> bool:
        return self.installed == self.tested

    def warning(self, constraints: Path) -> str:
        tested = f"was tested with {self.tested}" if self.tested else "was not tested with it"
        return (
            f"{self.name} {self.installed} is installed; Facecast {tested} ({constraints.name}): "
            f"a native library that differs can crash the server. Reinstall the tested set with "
            f"`pip install -c {constraints} -e .` (what `make install` runs)"
        )


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(constraints: Path) -> dict[str, str]:
    """``name == version`` lines of a pip constraints file, by canonical name."""
    versions = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        name, sep, version = requirement.partition("==")
        if not sep:
            raise ValueError(f"{constraints}: {line!r} is not an exact pin (name==version)")
        versions[canonical_name(name)] = version.strip()
    return versions


def _is_native(distribution: importlib.metadata.Distribution) -> bool:
    return any(
        file.name.endswith(NATIVE_SUFFIXES) or ".so." in file.name for file in distribution.files or ()
    )


def required_packages(root: str = "facecast", root_extras: tuple[str, ...] = ("dev",)) -> set[str]:
    """Canonical names of ``root`` and of every installed package it needs, directly or not."""
    found: set[str] = set()
    pending = [(root, ("", *root_extras))]
    while pending:
        name, extras = pending.pop()
        if canonical_name(name) in found:
            continue
        found.add(canonical_name(name))
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for requirement in map(Requirement, requirements):
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras):
                pending.append((requirement.name, ("", *requirement.extras)))
    return found


def native_dependencies(constraints: Path = CONSTRAINTS_FILE) -> list[Dependency]:
    """Every installed package with compiled code that Facecast needs or CI pinned, with its tested version.

    Other packages in the same environment are none of Facecast's business and are left out.
    """
    tested = pinned_versions(constraints)
    relevant = required_packages() | set(tested)
    found: dict[str, Dependency] = {}
    for distribution in importlib.metadata.distributions():
        name = canonical_name(distribution.metadata["Name"])
        if name in relevant and name not in found and _is_native(distribution):
            found[name] = Dependency(name, distribution.version, tested.get(name))
    return sorted(found.values(), key=lambda dependency: dependency.name)


def report(constraints: Path = CONSTRAINTS_FILE) -> tuple[dict[str, object], list[str]]:
    """(what doctor prints of the native packages, a warning for each one CI did not test)."""
    if not constraints.is_file():
        return {"constraints": None}, [f"no {constraints}: the installed versions cannot be checked"]
    dependencies = native_dependencies(constraints)
    warnings = [dependency.warning(constraints) for dependency in dependencies if not dependency.is_tested]
    return {
        "constraints": str(constraints),
        "native": {d.name: {"installed": d.installed, "tested": d.tested} for d in dependencies},
        "untested": [d.name for d in dependencies if not d.is_tested],
    }, warnings
