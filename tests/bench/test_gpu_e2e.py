"""bench/gpu_e2e.py runs end to end (--small: tiny shape on CPU), so the first GPU session does not
find a broken script. Its numbers are not checked: performance lives in bench/results, not tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_e2e_small_runs_and_writes_its_table(tmp_path: Path):
    out = tmp_path / "gpu-small.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_e2e.py"), "--small", "--items", "6", "--prompts", "1"]
    proc = subprocess.run(
        [*cmd, "--clients", "4", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| section | schedule | items | real tokens | computed tokens | items/s | tokens/s |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")][1:]
    sections = {ln.split("|")[1].strip() for ln in rows}
    assert {"mixed lengths", "service end to end"} <= sections
    schedules = [ln.split("|")[2].strip() for ln in rows]
    assert any(s.startswith("padded, arrival order") for s in schedules)
    assert any(s.startswith("length-sorted") for s in schedules)
    # Sharing is measured when the engine has the option, and said to be missing otherwise.
    assert "GRPO prefix sharing" in text
    for ln in rows:  # every measured cell is a positive number
        assert float(ln.split("|")[6]) > 0 and float(ln.split("|")[7]) > 0


def test_sharing_section_passes_the_option_and_counts_the_shared_prefix(tiny_engine, monkeypatch):
    """The on/off section cannot run here until the engine has the option; its wiring can."""
    from bench import gpu_e2e
    from scoring.engine import ScoringEngine

    modes: list[str] = []

    class WithOption(ScoringEngine):
        def __init__(self, rm, *, prefix_sharing: str = "auto", **kw) -> None:  # noqa: ANN001, ANN003
            modes.append(prefix_sharing)
            super().__init__(rm, **kw)

    monkeypatch.setattr(gpu_e2e, "ScoringEngine", WithOption)
    texts = gpu_e2e.grpo_texts(2, 3, (10, 12), (2, 4))
    rows = gpu_e2e.prefix_sharing(tiny_engine.rm, tiny_engine.policy, texts, repeats=1)
    assert modes == ["off", "auto"]
    off, on = rows
    assert off.items == on.items == 6 and off.tokens == on.tokens == off.computed
    assert on.computed < on.tokens  # the repeated prompt is counted once per group
