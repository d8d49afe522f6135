"""A real Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) for the PACS tests: its own
configuration and temporary storage, the site routing rule of ``docs/pacs/``, stopped by the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from tests.api.helpers import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ROUTE_LUA = Path(__file__).resolve().parents[2] / "docs" / "pacs" / "route-mr-to-btd.lua"
# As the README's Orthanc section says a site runs it: Debian's Orthanc uses the system DCMTK, which
# leaves Nagle's algorithm on unless TCP_NODELAY=1 (52 ms per stored instance with it on, 11 ms off).
ORTHANC_ENVIRONMENT = {"TCP_NODELAY": "1"}


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    missing = [str(p) for p in (Path(ORTHANC), DICOMWEB_PLUGIN) if not p.exists()]
    return f"not installed: {', '.join(missing)} (Debian packages orthanc, orthanc-dicomweb)" if missing else None


class Orthanc:
    """``with Orthanc(tmp, btd_port=...) as pacs: pacs.rest.get("/instances")``. AE title ORTHANC."""

    def __init__(self, folder: Path, *, btd_port: int, ae_title: str = "ORTHANC") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config = {
            "Name": "btd-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomModalities": {"btd": ["BTD", "127.0.0.1", btd_port]},
            "DicomScuTimeout": 30,
            "LuaScripts": [str(ROUTE_LUA)],
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "SaveJobs": False,
            "StorageCompression": False,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = folder / "orthanc.log"
        self.rest = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([ORTHANC, "--verbose", str(config_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **ORTHANC_ENVIRONMENT})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.rest.get("/system").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise AssertionError(f"Orthanc did not answer in 60 s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file through the REST API (as a modality's C-STORE would: the routing rule runs)."""
        response = self.rest.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
        response.raise_for_status()
        return response.json()

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Every instance's tags (simplified) of the study, SR and overlays included."""
        found = self.rest.post("/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                                    "Expand": True}).json()
        return [self.rest.get(f"/instances/{i['ID']}/simplified-tags").json() | {"ID": i["ID"]} for i in found]

    def file(self, instance_id: str) -> bytes:
        return self.rest.get(f"/instances/{instance_id}/file").content

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.rest.close()
        if hasattr(self, "_log"):
            self._log.close()
