"""A/B of the service between two source trees, side by side on one machine, runs alternating.

For a refactor that must not change throughput: both servers (`python -m cli serve` from each
tree, same model, same settings) stay up, and each repeat alternates which goes first, so drift in
the machine's load hits both alike. Reports every run and the paired after/before ratios.

Usage: `python bench/service_ab.py --before /path/to/old/tree [--after .] [--items 96] [--repeats 3]`;
writes bench/results/service-ab-<device>.md. Make the old tree with `git archive <rev> | tar -x -C DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import service_bench as sb  # noqa: E402

SHAPES = (("single", "/get_reward", 32), ("group", "/v1/score", 8))  # (shape, route, clients)


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout_s}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=ROOT)
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "service-ab-cpu.md")
    args = ap.parse_args()
    from model_store.default_model import build_default_model

    tmp = Path(tempfile.mkdtemp(prefix="hydra-ab-"))
    model_dir = build_default_model(tmp / "model", hidden_size=128, num_layers=2)
    pairs = sb.workload(args.items)
    texts = [f"{p}\n{r}" for p, r in pairs]
    bodies = {
        "single": [
            {"query": [t], "prompts": [p], "labels": [None]} for t, (p, _) in zip(texts, pairs, strict=True)
        ],
        "group": [
            {"items": [{"prompt": p, "response": r} for p, r in pairs[i : i + sb.GROUP]]}
            for i in range(0, len(pairs), sb.GROUP)
        ],
    }
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    procs, urls = [], {}
    runs: dict[tuple[str, str], list[float]] = {}
    log: list[str] = []
    try:
        for name, root in trees.items():
            env = dict(os.environ, PYTHONPATH=str(root), HYDRA_RM_STORE_ROOT=str(tmp / f"store-{name}"),
                       HYDRA_RM_LOG_LEVEL="warning")  # fmt: skip
            port = sb.free_port()
            cli = "cli" if (root / "cli" / "__main__.py").exists() else "service"  # before the package move
            cmd = [sys.executable, "-m", cli, "serve", "--model", str(model_dir), "--port", str(port)]
            procs.append(
                subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
            urls[name] = f"http://127.0.0.1:{port}"
            _wait_ready(urls[name], procs[-1])
        for shape, path, clients in SHAPES:
            for url in urls.values():  # warm-up
                asyncio.run(sb.drive(url, path, bodies[shape][:8], 8, 4))
            for rep in range(args.repeats):
                for name in ("before", "after") if rep % 2 == 0 else ("after", "before"):
                    r = asyncio.run(sb.drive(urls[name], path, bodies[shape], len(pairs), clients))
                    runs.setdefault((shape, name), []).append(r.items_per_s)
                    line = f"{shape} c={clients} {name}: {r.items_per_s:.1f} items/s, p50 {r.p50_ms:.0f} ms, errors {r.errors}"
                    log.append(line)
                    print(line, flush=True)
    finally:
        for proc in procs:
            sb.stop(proc)
    lines = [
        "# Service A/B: before vs after (cpu)",
        "",
        f"Command: `python bench/service_ab.py --before {args.before} --after {args.after} --items {args.items} "
        f"--repeats {args.repeats}`  ",
        f"Model: the default recipe at hidden 128, 2 layers, K=4; {args.items} prompt+response items; "
        f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (ratios, not absolutes).",
        "",
        "| shape | clients | before items/s (median) | after items/s (median) | paired after/before | median |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for shape, _, clients in SHAPES:
        b, a = runs[(shape, "before")], runs[(shape, "after")]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        lines.append(
            f"| {shape} | {clients} | {statistics.median(b):.1f} | {statistics.median(a):.1f} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |"
        )
    lines += ["", "Runs in order:", "", *[f"- {x}" for x in log], ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
