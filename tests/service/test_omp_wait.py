"""`hydra-rm serve` sets OMP_WAIT_POLICY=PASSIVE before torch loads (libgomp reads it only then), and
an explicit value in the environment wins (bench/results/peer-threads-ab-cpu.md has the measurement)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys
import service.server
def run(settings):
    import os
    print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
service.server.run = run
from cli.main import app
app(["serve", "--port", "0"])
"""


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_serve_sets_passive_omp_wait_before_torch_loads(given: str | None, seen: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split()[-2:] == [seen, "False"], out.stdout + out.stderr
