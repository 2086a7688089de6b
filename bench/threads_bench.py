"""Torch intra-op threads on a small CPU host: 1 vs 2 threads, quiet and beside a busy neighbour.

What it measures (one run, configurations alternated within each round, median of --rounds):
- the service (`python -m cli serve`, one process per configuration, all up at once) at 32
  closed-loop clients sending OpenRLHF-shaped `/get_reward` requests (one text each, the items of
  bench/service_bench.py), with HYDRA_RM_TORCH_THREADS=1, =2, and =2 with OMP_WAIT_POLICY=PASSIVE;
- the batch job (`ScoreJob` on a JSONL file behind `build_engine`, i.e. what `hydra-rm score` runs)
  with 1 and 2 threads, applied by `scoring.settings.apply_torch_threads`;
- each twice: on a quiet machine, and with a neighbour process spinning one core
  (`python -c "while True: pass"`).

Service runs are time-bounded (--seconds each; items/s counts the requests finished in that window)
because a slow configuration beside a busy neighbour would otherwise take minutes per round.

Usage: `python bench/threads_bench.py [--rounds 3] [--seconds 10] [--job-items 160]`; writes
bench/results/threads-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from service_bench import RawClient, free_port, start, stop, workload  # noqa: E402

CLIENTS = 32
# name -> (HYDRA_RM_TORCH_THREADS, extra environment of the server process)
SERVICE_CONFIGS: dict[str, tuple[int, dict[str, str]]] = {
    "1 thread": (1, {}),
    "2 threads": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
JOB_CONFIGS = {"1 thread": 1, "2 threads": 2}


async def drive_for(port: int, bodies: list[bytes], seconds: float, concurrency: int) -> float:
    """Closed-loop clients for a fixed time; items/s over the requests finished in it."""
    done = 0
    deadline = time.perf_counter() + seconds
    cycle: Iterator[bytes] = (bodies[i % len(bodies)] for i in range(10**9))

    async def worker() -> None:
        nonlocal done
        client = RawClient("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                status, _ = await client.post("/get_reward", next(cycle))
                if status != 200:
                    raise RuntimeError(f"HTTP {status}")
                done += 1
        finally:
            client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def neighbour() -> subprocess.Popen:
    """Another process keeping one core busy, as a training job or a second service would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each service run")
    ap.add_argument("--job-items", type=int, default=160)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "threads-cpu.md")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from jobs.local import ScoreJob
    from model_store.default_model import build_default_model
    from scoring.settings import Settings, apply_torch_threads, build_engine

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="hydra-threads-bench-"))
    model_dir = build_default_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    pairs = workload(480)
    bodies = [
        json.dumps({"query": [f"{p}\n{r}"], "prompts": [p], "labels": [None]}).encode() for p, r in pairs
    ]
    src = tmp / "job.jsonl"
    src.write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs[: args.job_items])
    )

    settings = {
        n: Settings(model=str(model_dir), store_root=tmp / "store", torch_threads=t)
        for n, t in JOB_CONFIGS.items()
    }
    engine = build_engine(settings["1 thread"])
    engine.warmup()

    def run_job(name: str) -> float:
        assert apply_torch_threads(settings[name]) == torch.get_num_threads() == JOB_CONFIGS[name]
        t0 = time.perf_counter()
        ScoreJob(engine, src, tmp / "out.jsonl").run(restart=True, progress_bar=False)
        return args.job_items / (time.perf_counter() - t0)

    base_env = dict(
        os.environ, PYTHONPATH=str(ROOT), HYDRA_RM_STORE_ROOT=str(tmp / "store"), HYDRA_RM_LOG_LEVEL="warning"
    )
    ports: dict[str, int] = {}
    procs: list[subprocess.Popen] = []
    results: dict[tuple[str, str, str], list[float]] = {}  # (condition, what, config) -> items/s per round
    loads: dict[str, tuple[float, float]] = {}
    try:
        for name, (threads, extra) in SERVICE_CONFIGS.items():
            port = free_port()
            env = {**base_env, "HYDRA_RM_TORCH_THREADS": str(threads), **extra}
            cmd = [sys.executable, "-m", "cli", "serve", "--model", str(model_dir), "--port", str(port)]
            procs.append(start(cmd, env, port))
            ports[name] = port
            asyncio.run(drive_for(port, bodies, 1.0, 4))  # warm-up
        for condition in ("quiet", "busy neighbour"):
            spinner = neighbour() if condition != "quiet" else None
            loads[condition] = os.getloadavg()[:2]
            try:
                for r in range(args.rounds):
                    for name, port in ports.items():
                        ips = asyncio.run(drive_for(port, bodies, args.seconds, CLIENTS))
                        results.setdefault((condition, "service", name), []).append(ips)
                        print(f"{condition:15s} round {r} service {name:38s} {ips:7.1f} items/s", flush=True)
                    for name in JOB_CONFIGS:
                        ips = run_job(name)
                        results.setdefault((condition, "job", name), []).append(ips)
                        print(f"{condition:15s} round {r} job     {name:38s} {ips:7.1f} items/s", flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    finally:
        for proc in procs:
            stop(proc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(args, results, loads, load_start, torch.__version__))
    print(f"wrote {args.out}")


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, str, str], list[float]],
    loads: dict[str, tuple[float, float]],
    load_start: tuple[float, float, float],
    torch_version: str,
) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        "# Torch intra-op threads on CPU: quiet machine vs a busy neighbour",
        "",
        f"Command: `python bench/threads_bench.py --rounds {args.rounds} --seconds {args.seconds:g} "
        f"--job-items {args.job_items}`  ",
        f"Model: the embedded default's recipe (Llama-style decoder), hidden {args.hidden}, "
        f"{args.layers} layers, K=4 heads, fp32. torch {torch_version}, {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}. Items: bench/service_bench.py's workload "
        "(prompts 5-40 words, responses 10-200 words, seed 0).",
        "",
        "Load average (1 min, 5 min) when each condition started: "
        + "; ".join(f"{c} {a:.2f}, {b:.2f}" for c, (a, b) in loads.items())
        + f" (at the start of the run {load_start[0]:.2f}). The quiet condition had no other benchmark "
        "running, but the machine is shared; configurations alternate within each round so drift hits "
        f"all alike. Medians of {args.rounds} rounds; each service run is {args.seconds:g} s of "
        f"{CLIENTS} closed-loop clients; each job run scores {args.job_items} items.",
        "",
        'Busy neighbour: a separate process running `python -c "while True: pass"` (one core at 100%).',
        "",
        "| what | condition | configuration | items/s (median) | rounds | vs 2 threads |",
        "|---|---|---|---:|---|---:|",
    ]
    for (cond, what, name), xs in results.items():
        base = med[(cond, what, "2 threads")]
        label = "service, 32 clients" if what == "service" else "batch job"
        lines.append(
            f"| {label} | {cond} | {name} | {med[(cond, what, name)]:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in xs)} | {med[(cond, what, name)] / base:.2f}x |"
        )
    lines += ["", "## Ratios", ""]
    for what in ("service", "job"):
        q1, q2 = med[("quiet", what, "1 thread")], med[("quiet", what, "2 threads")]
        b1, b2 = med[("busy neighbour", what, "1 thread")], med[("busy neighbour", what, "2 threads")]
        lines.append(
            f"- {what}: quiet, 2 threads / 1 thread = **{q2 / q1:.2f}x**; busy neighbour, "
            f"1 thread / 2 threads = **{b1 / b2:.2f}x**; 2 threads lose {1 - b2 / q2:.0%} to the neighbour, "
            f"1 thread loses {1 - b1 / q1:.0%}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
