"""bench/peer_vllm.py's own logic on a tiny shape without vLLM: two hydra-rm servers, alternating
rounds, the HF exactness check, the A/B table and the metrics breakdown; hand-written notes survive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.peer_vllm import NOTES

ROOT = Path(__file__).resolve().parents[2]
TINY = "--no-vllm --rounds 2 --prompts 2 --group 3 --distinct 4 --latency-items 2 --hidden 32 --layers 1"


def test_peer_bench_tiny_without_vllm(tmp_path: Path):
    out = tmp_path / "peer.md"
    out.write_text(f"old generated text\n{NOTES}\nmy profile\n")
    cmd = [sys.executable, "bench/peer_vllm.py", *TINY.split(), "--clients", "3"]
    cmd += ["--b-env", "HYDRA_RM_PREFIX_SHARING=off", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "old generated text" not in text and text.rstrip().endswith("my profile")
    exact = next(ln for ln in text.splitlines() if ln.startswith("Exactness"))
    worst = [float(x.split()[-1].rstrip(".,")) for x in exact.split(":", 1)[1].split(",")]
    assert len(worst) == 2 and max(worst) < 1e-4  # both servers reproduce HF's logits
    lines = text.splitlines()
    table = lines[lines.index("| workload | round | hydra-rm | hydra-rm B |") :]
    rounds = [ln for ln in table if ln.startswith(("| grpo | ", "| distinct | "))]
    assert len(rounds) == 4  # 2 workloads x 2 rounds, one column per server
    assert "- grpo (items_per_s): **" in text  # the A/B ratio
    breakdown = [ln for ln in lines if ln.startswith("| hydra-rm | grpo | ")]
    assert len(breakdown) == 1 and int(breakdown[0].split("|")[3]) >= 1  # batches read from /metrics
    assert "Errors (non-200 replies) over all runs: 0." in text
