"""schemathesis over the served /openapi.json (every check, positive and negative data) against a real
server: no 5xx, every status and body documented, schema-valid input accepted, invalid input rejected.

It runs the `st` CLI, as CI would; a fixed seed keeps CI reproducible (raise --max-examples locally
to explore further).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scoring.settings import Settings
from tests.service.conftest import live_server

ST = Path(sys.executable).with_name("st")


def run_schemathesis(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(ST),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "60",
        "--seed",
        "20261101",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_schemathesis_finds_no_failures(tiny_engine):
    with live_server(Settings(max_items_per_request=32), tiny_engine) as live:
        out = run_schemathesis(live.url)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout


def test_schemathesis_with_api_keys(tiny_engine):
    settings = Settings(api_keys=["schema-key"], max_items_per_request=32)
    with live_server(settings, tiny_engine) as live:
        out = run_schemathesis(live.url, "-H", "Authorization: Bearer schema-key")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
