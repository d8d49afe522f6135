"""Declared dependencies match what the code imports, and the README says what each one is for."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# What each import package may use: the service installs the base dependencies with an ONNX Runtime
# (and optionally the DICOM codecs; btd validate the report extra); the pipeline adds the train extra.
ALLOWED = {
    "app": PROJECT["dependencies"] + EXTRAS["cpu"] + EXTRAS["gpu"] + EXTRAS["dicom-codecs"] + EXTRAS["report"],
    "model_export": PROJECT["dependencies"] + EXTRAS["cpu"] + EXTRAS["train"],
}
# Imported through a declared dependency that exposes it as part of its own API.
PROVIDED_BY = {"starlette": "fastapi", "requests": "dicomweb-client"}  # dicomweb-client raises requests' errors


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def third_party_imports(package: str) -> set[str]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in sys.stdlib_module_names and n not in ("__future__", "app", "model_export")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_third_party_import_is_a_declared_dependency(package: str) -> None:
    declared = {requirement_name(r) for r in ALLOWED[package]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in third_party_imports(package):
        names = {normalise(d) for d in distributions.get(module, [module])}
        if not names & declared and PROVIDED_BY.get(module) not in declared:
            undeclared[module] = sorted(names)
    assert not undeclared, f"{package} imports packages its install does not declare: {undeclared}"


def test_readme_dependency_table_names_every_declared_dependency() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Dependencies")
    section = readme[start:readme.index("\n## ", start + 1)]
    package_column = " ".join(row.split("|")[1] for row in section.splitlines() if row.startswith("|"))
    names = {requirement_name(r) for extra in (PROJECT["dependencies"], *EXTRAS.values()) for r in extra}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", normalise(package_column)))
    assert not missing, f"README's dependency table does not say what these are for: {missing}"
