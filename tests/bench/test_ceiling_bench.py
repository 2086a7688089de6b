"""bench/ceiling_bench.py runs end to end on a tiny shape and reads the server's own batch metrics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ceiling_bench_tiny_writes_ratio_and_breakdown(tmp_path: Path):
    out = tmp_path / "ceiling.md"
    cmd = [sys.executable, "bench/ceiling_bench.py", "--requests", "6", "--clients", "2", "--pairs", "1"]
    cmd += ["--hidden", "32", "--layers", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    text = out.read_text()
    assert "| 2 | **" in text  # the median ratio row for 2 clients
    rows = [ln for ln in text.splitlines() if ln.startswith("| 2 | service |")]
    assert len(rows) == 1
    batches = int(rows[0].split("|")[3])
    assert batches >= 1  # scraped from /metrics: the server really ran batches in that window
