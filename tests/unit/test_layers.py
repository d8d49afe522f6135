"""The layers hold: import-linter's contracts (pyproject.toml, [tool.importlinter]) are kept, and a
broken one is caught (the check is not vacuous)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_every_import_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") == 4


def test_an_upward_import_breaks_the_layers(tmp_path: Path):
    # A copy of the packages where the core imports the HTTP transport: the layers contract breaks.
    import shutil

    for package in ("app", "model_export"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    contract = tmp_path / "app" / "core" / "contract.py"
    contract.write_text(contract.read_text() + "\nfrom app.transports.http import routes  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Service layers" in result.stdout and "BROKEN" in result.stdout
    assert "app.core.contract -> app.transports.http.routes" in result.stdout
