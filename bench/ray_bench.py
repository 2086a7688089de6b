"""Batch scoring throughput: `hydra-rm score-ray` (Ray Data actor pool) vs local `hydra-rm score`.

Both commands run as they would for a user, one after the other on the same JSONL file and model, and
the ratio is taken within this one run. Two views:
- end to end: the whole command's wall time (process start, model load, Ray cluster and actor start
  for score-ray), which is what a user waits for;
- start-up: when the first chunk was written, read from the job's own checkpoint of progress
  (`<output>.progress.json`, polled), which shows how much of the wall time is fixed cost.

Usage: `python bench/ray_bench.py [--items 1200] [--hidden 256] [--layers 4] [--actors 2]`;
writes bench/results/ray-<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service_bench import WORDS  # noqa: E402  (the service bench's vocabulary)
from model_store.default_model import build_default_model  # noqa: E402


def write_input(path: Path, n: int, seed: int = 0) -> None:
    """Prompts of 5-40 words, responses of 10-200 words (bench/service_bench.py's workload), seeded."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 200)))
            f.write(json.dumps({"id": i, "prompt": prompt, "response": response}) + "\n")


def run(cmd: list[str], progress: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time of the command, and the time between its first and last checkpoint (lines scored)."""
    seen: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        last = -1
        while not done.is_set():
            try:
                lines = json.loads(progress.read_text())["lines_done"]
            except (OSError, ValueError, KeyError):
                lines = -1
            if lines != last and lines >= 0:
                seen.append((time.monotonic(), lines))
                last = lines
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.monotonic() - t0
    done.set()
    t.join()
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    first = next((t_ - t0 for t_, n in seen if n > 0), wall)
    return {"wall": wall, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1200)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=100)
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="hydra-ray-bench-"))
    model = build_default_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    src = tmp / "in.jsonl"
    write_input(src, args.items)
    exe = [sys.executable, "-m", "cli"]
    common = ["-i", str(src), "--model", str(model), "--store", str(tmp / "store"), "--no-progress"]
    common += ["--chunk-size", str(args.chunk_size)]
    local = run([*exe, "score", *common, "-o", str(tmp / "local.jsonl")], tmp / "local.jsonl.progress.json")
    # Ray gives each 1-CPU actor OMP_NUM_THREADS=1; on a busy machine torch's 2 threads can be far
    # slower than 1 (DESIGN.md), so the local job with one thread is measured too.
    local1 = run(
        [*exe, "score", *common, "-o", str(tmp / "local1.jsonl")],
        tmp / "local1.jsonl.progress.json",
        env={"OMP_NUM_THREADS": "1"},
    )
    ray_cmd = [
        *exe,
        "score-ray",
        *common,
        "-o",
        str(tmp / "ray.jsonl"),
        "--actors",
        str(args.actors),
        "--address",
        "local",
    ]
    ray = run([*ray_cmd, "--num-cpus", "1"], tmp / "ray.jsonl.progress.json")

    same = (tmp / "local.jsonl").read_text().splitlines()
    other = (tmp / "ray.jsonl").read_text().splitlines()
    max_diff = max(
        abs(json.loads(a)["reward"] - json.loads(b)["reward"]) for a, b in zip(same, other, strict=True)
    )
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"# Batch job: Ray Data vs local ({device})",
        "",
        f"Command: `python bench/ray_bench.py --items {args.items} --hidden {args.hidden} --layers "
        f"{args.layers} --actors {args.actors} --chunk-size {args.chunk_size}`  ",
        f"Model: Llama-style decoder, hidden {args.hidden}, {args.layers} layers, K=4 heads, fp32; "
        f"{args.items} prompt+response items (5-40 + 10-200 words); one run of each, back to back; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}. The machine was shared "
        "with other jobs while this ran (1-minute load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores), so absolute "
        "numbers are noisy; the ratios within this run are what it measures.",
        "",
        "Speed-up: this row's end-to-end time over score-ray's (1.00x for score-ray itself). Ray's "
        "actors score chunks ahead of the driver, so only end-to-end times compare fairly.",
        "",
        "| job | end to end (s) | first chunk written (s) | items/s end to end | score-ray speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in (
        ("`hydra-rm score` (one process, torch's default threads)", local),
        ("`hydra-rm score`, OMP_NUM_THREADS=1", local1),
        (f"`hydra-rm score-ray --actors {args.actors} --num-cpus 1` (new local Ray)", ray),
    ):
        speedup = r["wall"] / ray["wall"]
        lines.append(
            f"| {name} | {r['wall']:.1f} | {r['first']:.1f} | {args.items / r['wall']:.1f} | {speedup:.2f}x |"
        )
    lines += [
        "",
        f"Outputs agree: {len(other)} lines each, rewards within {max_diff:.1e}.",
        "",
    ]
    out = ROOT / "bench" / "results" / f"ray-{device}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
