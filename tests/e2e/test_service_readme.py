"""The README's API section works as written: its curl examples against a real server, and its
configuration table lists every BTD_* setting."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from app.settings import Settings
from tests.api.helpers import ServerProcess
from tests.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
API_SECTION = README[README.index("## API"):README.index("\n## ", README.index("## API") + 1)]


def test_readme_configuration_lists_every_setting():
    for name in Settings.model_fields:
        assert f"`BTD_{name.upper()}`" in API_SECTION, name


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_work_as_written(tmp_path):
    block = re.search(r"```bash\n(.*?)```", API_SECTION, re.DOTALL).group(1)
    with ServerProcess(build_model(tmp_path / "m.onnx")) as server:
        script = re.sub(r"/tmp\b", str(tmp_path), block.replace("http://127.0.0.1:8000", server.url))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False, cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert '{"status":"ok"}' in out and '"request_id":"pacs-0001"' in out and '"format":"grid"' in out
    assert '"results":[' in out and '"providers":["CPUExecutionProvider"]' in out and "btd_model_info{" in out
    assert "415" in out and "/problems/unsupported-media-type" in out
    assert (tmp_path / "overlay.png").read_bytes().startswith(b"\x89PNG")
