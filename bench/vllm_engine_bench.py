"""hydra-rm on the vLLM engine vs raw vLLM `/classify`, side by side (issue 19; goal >= 0.95x raw vLLM).

The same Qwen2-style K=4 model (hidden 256, 4 layers, fp32) served twice: `hydra-rm serve` with
`HYDRA_RM_ENGINE=vllm` (its own managed vLLM child, prefix caching on) and a raw vLLM server started
exactly as hydra-rm starts its child. The issue-18 workloads, one sample per POST, 32 closed-loop
clients: GRPO (24 prompts x 8 responses, prompts 300-800 tokens) and distinct (192 items, each with
its own prompt). Fresh texts every round (no prefix-cache reuse across rounds); the two servers
alternate within each round and the ratio is paired per round.

`.venv/bin/python bench/vllm_engine_bench.py [--rounds 5]` (needs `make vllm-env`); writes
bench/results/vllm-engine-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ceiling_bench import build_qwen2  # noqa: E402
from prefix_bench import grpo_texts  # noqa: E402
from service_bench import drive, free_port  # noqa: E402

from scoring.vllm_engine import LAUNCHER, find_vllm_python  # noqa: E402

WORKLOADS = {"grpo": (24, 8, True), "distinct": (192, 1, False)}
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout_s: float = 1800) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm-engine-cpu.md")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from model_store.manifest import RewardManifest

    tmp = Path(tempfile.mkdtemp(prefix="vllm-engine-bench-"))
    model = build_qwen2(tmp / "model")
    manifest = RewardManifest.read(model)
    assert manifest is not None
    manifest.max_length = 2048
    manifest.write(model)
    tok = AutoTokenizer.from_pretrained(model)
    env = {**os.environ, **ENV}
    hydra_port, raw_port = free_port(), free_port()
    hydra = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--model", str(model), "--port", str(hydra_port)],
        cwd=ROOT,
        env={**env, "HYDRA_RM_ENGINE": "vllm", "HYDRA_RM_LOG_LEVEL": "warning"},
        stdout=(tmp / "hydra.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    raw_cmd = [
        str(find_vllm_python(None)), str(LAUNCHER), "--model", str(model), "--served-model-name", "rm",
        "--host", "127.0.0.1", "--port", str(raw_port), "--runner", "pooling", "--convert", "classify",
        "--pooler-config", '{"use_activation": false}', "--max-model-len", "2048", "--dtype", "float32",
        "--enable-prefix-caching", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    raw = subprocess.Popen(
        raw_cmd, env=env, stdout=(tmp / "raw.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        hydra_url, raw_url = f"http://127.0.0.1:{hydra_port}", f"http://127.0.0.1:{raw_port}"
        startup = {
            "hydra-rm (vllm engine)": wait_ready(hydra_url, "/readyz", hydra),
            "raw vLLM": wait_ready(raw_url, "/health", raw),
        }

        def bodies(who: str, texts: list[str]) -> tuple[str, str, list[dict]]:
            if who == "hydra":
                return hydra_url, "/get_reward", [{"query": [t]} for t in texts]
            return raw_url, "/classify", [{"model": "rm", "input": [t]} for t in texts]

        rates: dict[str, dict[str, list[float]]] = {wl: {"hydra": [], "raw": []} for wl in WORKLOADS}
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            for wl, (prompts, group, shared) in WORKLOADS.items():
                texts = grpo_texts(tok, 5000 + 10 * r + len(wl), prompts, group, shared=shared)
                for who in ("hydra", "raw") if r % 2 else ("raw", "hydra"):
                    url, path, bs = bodies(who, texts)
                    res = asyncio.run(drive(url, path, bs, len(texts), args.clients))
                    assert res.errors == 0, f"{who} answered {res.errors} errors"
                    if r:
                        rates[wl][who].append(res.items_per_s)
                    print(f"round {r} {wl:8s} {who:5s} {res.items_per_s:6.1f} items/s", flush=True)
        # Exactness: the same texts through both, per head.
        import httpx

        texts = grpo_texts(tok, 99, 2, 4)
        h = httpx.post(
            hydra_url + "/v1/score", json={"items": [{"text": t} for t in texts]}, timeout=300
        ).json()
        v = httpx.post(raw_url + "/classify", json={"model": "rm", "input": texts}, timeout=300).json()
        diff = max(
            abs(a - b)
            for res, d in zip(h["results"], sorted(v["data"], key=lambda d: d["index"]), strict=True)
            for a, b in zip(res["heads"], d["probs"], strict=True)
        )
    finally:
        stop(hydra)
        stop(raw)
    lines = [
        "# hydra-rm on the vLLM engine vs raw vLLM /classify (CPU)",
        "",
        f"`.venv/bin/python bench/vllm_engine_bench.py --rounds {args.rounds}`; vllm-cpu 0.32.0, Qwen2-style "
        f"K=4 (hidden 256, 4 layers), fp32, prefix caching on in both; one sample per POST, {args.clients} "
        f"closed-loop clients, fresh texts each round, the two servers alternating within a round. Load: "
        f"`{os.popen('uptime').read().strip()}` (a shared 2-core machine: absolute numbers are noisy, the "
        f"paired ratios less so).",
        "",
        "| workload | hydra-rm items/s | raw vLLM items/s | hydra / raw, paired (mean +- se) | rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = {}
    for wl, per in rates.items():
        ratios = [a / b for a, b in zip(per["hydra"], per["raw"], strict=True)]
        se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
        summary[wl] = (statistics.mean(ratios), se)
        lines.append(
            f"| {wl} | {statistics.mean(per['hydra']):.1f} | {statistics.mean(per['raw']):.1f} | "
            f"**{statistics.mean(ratios):.3f}** +- {se:.3f} | {len(ratios)} |"
        )
    lines += [
        "",
        "Start-up (both starting at once): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
        + f". Per-head rewards of the two servers on the same texts: max difference {diff:.2e}.",
        "",
        "Per-round items/s: " + json.dumps(rates),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
