"""The README's PACS section shows what the tests run: its routing rule is docs/pacs/route-mr-to-btd.lua,
its Orthanc configuration parses and wires the same modality, rule, plugin and DICOMweb root."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.pacs.orthanc import ROUTE_LUA, Orthanc

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SECTION = README[README.index("## PACS"):README.index("\n## ", README.index("## PACS") + 1)]


def test_readme_routing_rule_is_the_tested_one():
    shown = re.search(r"```lua\n(.*?)```", SECTION, re.DOTALL).group(1).strip()
    tested = "\n".join(line for line in ROUTE_LUA.read_text().splitlines() if not line.startswith("--")).strip()
    assert shown == tested


def test_readme_orthanc_configuration_wires_what_the_tests_wire(tmp_path):
    site = json.loads(re.search(r"```json\n(.*?)```", SECTION, re.DOTALL).group(1))
    tested = Orthanc(tmp_path, btd_port=11112).config
    assert site["DicomModalities"]["btd"][0] == tested["DicomModalities"]["btd"][0] == "BTD"
    assert Path(site["LuaScripts"][0]).name == ROUTE_LUA.name
    assert site["Plugins"] == tested["Plugins"]
    assert site["DicomWeb"]["Root"] == tested["DicomWeb"]["Root"] and site["DicomWeb"]["Enable"]
    assert site["DicomAet"] == tested["DicomAet"] and site["DicomCheckCalledAet"] == tested["DicomCheckCalledAet"]
    assert "'BTD'" in ROUTE_LUA.read_text()  # the rule skips what the listener's AE title sends back
