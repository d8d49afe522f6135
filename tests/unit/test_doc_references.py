"""What the project's texts send a reader to exists: the README sections that messages, comments and
the README itself name, and the documents that docstrings cite."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SOURCES = ("app", "model_export", "scripts", "bench", "models", "tests", "k8s", "docker")
TOP_LEVEL = ("README.md", "Dockerfile", "pyproject.toml")
SUFFIXES = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".js", ".mjs", ".html", ".env", ""}
SECTION_IN_CODE = re.compile(r'README(?:\'s)?,? \\?"([^"\\]+)\\?"')  # (README, "Configuration")
SECTION_IN_README = re.compile(r'\(see "([^"]+)"\)|, see "([^"]+)"|in "([^"]+)" describe')
DOCUMENT = re.compile(r"\b([A-Z][A-Z0-9_]*\.md)\b")  # README.md, MODEL_CARD.md: project documents


def project_texts() -> dict[Path, str]:
    paths = [REPO / name for name in TOP_LEVEL]
    for folder in SOURCES:
        paths += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES
                  and "node_modules" not in p.parts and "__pycache__" not in p.parts]
    return {p: p.read_text(errors="replace") for p in paths if p.is_file()}


def readme_headings() -> set[str]:
    return {line.lstrip("#").strip() for line in README.splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_sections_named_anywhere_exist() -> None:
    headings = readme_headings()
    named = {(path.relative_to(REPO), m.group(1)) for path, text in project_texts().items()
             for m in SECTION_IN_CODE.finditer(text)}
    named |= {(Path("README.md"), next(g for g in m.groups() if g)) for m in SECTION_IN_README.finditer(README)}
    assert named, "the patterns find nothing: they no longer match how sections are named"
    missing = sorted((str(path), name) for path, name in named if name not in headings)
    assert not missing, f"these name README sections that do not exist: {missing}"


def test_documents_cited_are_in_the_project() -> None:
    present = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts}
    cited = {(path.relative_to(REPO), m.group(1)) for path, text in project_texts().items()
             for m in DOCUMENT.finditer(text)}
    missing = sorted((str(path), name) for path, name in cited if name not in present)
    assert not missing, f"these cite documents that are not in the project: {missing}"


def test_missing_model_help_names_real_sections() -> None:
    from app.__main__ import MISSING_MODEL_HELP

    named = SECTION_IN_CODE.findall(MISSING_MODEL_HELP)
    assert named and set(named) <= readme_headings()
