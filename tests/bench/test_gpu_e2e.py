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


def test_sharing_section_measures_off_then_on_and_counts_the_shared_prefix(tiny_llama_dir, store):  # noqa: ANN001
    """Off and on through the policy (the engine's own switch), on a decoder the self-check accepts."""
    from bench import gpu_e2e
    from model_store.loader import load_reward_model
    from scoring.batching import BatchPolicy

    rm = load_reward_model(str(tiny_llama_dir), store)
    texts = gpu_e2e.grpo_texts(2, 3, (10, 12), (2, 4))
    rows = gpu_e2e.prefix_sharing(rm, BatchPolicy.resolve("cpu"), texts, repeats=1)
    assert [r.schedule for r in rows] == ["sharing off", "sharing auto"]
    off, on = rows
    assert off.items == on.items == 6 and off.tokens == on.tokens == off.computed
    assert on.computed < on.tokens  # the repeated prompt is counted once per group


def test_sharing_section_refuses_to_report_what_it_did_not_measure(tiny_bert_dir, store):  # noqa: ANN001
    """An encoder cannot share a prefix: the section raises instead of timing sharing 'on' as off."""
    import pytest

    from bench import gpu_e2e
    from model_store.loader import load_reward_model
    from scoring.batching import BatchPolicy

    rm = load_reward_model(str(tiny_bert_dir), store)
    with pytest.raises(RuntimeError, match="refused"):
        gpu_e2e.prefix_sharing(rm, BatchPolicy.resolve("cpu"), ["a b c d e f g h"] * 2, repeats=1)
