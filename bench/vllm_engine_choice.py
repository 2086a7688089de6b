"""How hydra-rm should drive vLLM, decided by measurement (issue 19, steps 1-2).

Three ways to get the K rewards of the same token ids out of vLLM's CPU build, alternating in rounds
with fresh texts every round (so vLLM's prefix cache gets no reuse across rounds):

- `inproc`: vLLM's `AsyncLLM` inside the calling process (what running hydra-rm inside vLLM's venv
  would mean), one `encode` per item, `task=classify`;
- `child_classify`: a managed `vllm.entrypoints.openai.api_server` child on loopback, `POST /classify`
  with token-id inputs, one HTTP request per batch; vLLM's own classifier returns the K raw logits;
- `child_embed`: the same child with `--convert embed` (last-token pooling, no activation), `POST
  /v1/embeddings` with base64 float32, and the K heads computed here from the
  returned hidden state (what the fused-kernel variant would cost: H floats per item over the wire).

Every mode submits the same batches (16 items, up to 4 in flight: what hydra-rm's batcher would
send). Run from the repository root:
`.venv/bin/python bench/vllm_engine_choice.py` (it re-executes its measuring half under
`.venv-vllm/bin/python`, `make vllm-env` first). Writes bench/results/vllm-engine-choice-cpu.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
CHUNK, IN_FLIGHT = 16, 4


# -- half 1 (hydra-rm's venv): model and token ids -------------------------------------------------
def prepare(out: Path, rounds: int, prompts: int, distinct: int) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from ceiling_bench import build_qwen2
    from prefix_bench import grpo_texts

    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import Item, ScoringEngine

    model_dir = build_qwen2(out / "model")
    from model_store.manifest import RewardManifest

    manifest = RewardManifest.read(model_dir)
    assert manifest is not None
    manifest.max_length = 2048
    manifest.write(model_dir)
    engine = ScoringEngine(load_reward_model(str(model_dir), ModelStore(out / "store")))
    tok = engine.tokenizer
    # The hidden-state variant serves the trunk alone (hydra-rm would hold the heads): vLLM's embed
    # runner refuses a checkpoint with a `score` layer it does not use.
    engine.model.base_model.save_pretrained(out / "trunk", safe_serialization=True)
    tok.save_pretrained(out / "trunk")
    work: dict[str, list[list[list[int]]]] = {"grpo": [], "distinct": []}
    for r in range(rounds + 1):  # round 0 warms up
        for name, shared, n, group in (("grpo", True, prompts, 8), ("distinct", False, distinct, 1)):
            texts = grpo_texts(tok, 1000 + r, n, group, shared=shared)
            work[name].append([engine.encode(Item(text=t)).input_ids for t in texts])
    # The reference: hydra-rm's torch engine on round 1's GRPO ids (HF parity is tested elsewhere).
    from model_store.tokenization import EncodedItem

    ref = engine.forward_padded([EncodedItem(ids, None, False, len(ids)) for ids in work["grpo"][1][:16]])
    (out / "work.json").write_text(
        json.dumps({"model": str(model_dir), "work": work, "ref": [s.rewards for s in ref]})
    )


# -- half 2 (vLLM's venv): the three modes ---------------------------------------------------------
def _server(model: str, port: int, convert: str, log: Path) -> subprocess.Popen:
    pooler = (
        {"use_activation": False}
        if convert == "classify"
        else {"seq_pooling_type": "LAST", "use_activation": False}
    )
    cmd = [
        sys.executable, str(ROOT / "scoring" / "vllm_child.py"), "--model", model,
        "--served-model-name", "rm", "--host", "127.0.0.1", "--port", str(port),
        "--runner", "pooling", "--convert", convert, "--dtype", "float32", "--max-model-len", "2048",
        "--enable-prefix-caching", "--pooler-config", json.dumps(pooler),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env={**os.environ, **CPU_ENV}, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def _wait(port: int, proc: subprocess.Popen, timeout: float = 1800.0) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM child on port {port} exited {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("vLLM child did not become healthy")


def measure(work_file: Path, rounds: int, out_md: Path) -> None:
    from safetensors import safe_open

    data = json.loads(work_file.read_text())
    model, work = data["model"], data["work"]
    with safe_open(str(Path(model) / "model.safetensors"), "pt") as f:
        w_score = f.get_tensor("score.weight").float()
    tmp = Path(tempfile.mkdtemp())
    ports = {"child_classify": 18811, "child_embed": 18812}
    procs = {
        "child_classify": _server(model, ports["child_classify"], "classify", tmp / "classify.log"),
        "child_embed": _server(
            str(Path(model).parent / "trunk"), ports["child_embed"], "embed", tmp / "embed.log"
        ),
    }
    try:
        _measure(procs, ports, model, work, data, w_score, rounds, out_md)
    finally:
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)


def _measure(
    procs: dict, ports: dict, model: str, work: dict, data: dict, w_score: Any, rounds: int, out_md: Path
) -> None:
    import httpx
    import torch
    from vllm import PoolingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    startup = {k: _wait(ports[k], p) for k, p in procs.items()}
    t0 = time.monotonic()
    os.environ.update(CPU_ENV)
    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model,
            runner="pooling",
            convert="classify",
            dtype="float32",
            max_model_len=2048,
            enable_prefix_caching=True,
            pooler_config={"use_activation": False},
        )  # fmt: skip
    )
    startup["inproc"] = time.monotonic() - t0
    params = PoolingParams(task="classify", use_activation=False)
    seq = [0]

    async def inproc(batch: list[list[int]]) -> list[list[float]]:
        async def one(ids: list[int]) -> list[float]:
            seq[0] += 1
            last = None
            async for o in llm.encode({"prompt_token_ids": ids}, params, request_id=f"r{seq[0]}"):
                last = o
            return last.outputs.data.tolist()

        return list(await asyncio.gather(*(one(ids) for ids in batch)))

    client = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=16))
    wire_bytes = {"child_classify": 0, "child_embed": 0}

    async def classify(batch: list[list[int]]) -> list[list[float]]:
        r = await client.post(
            f"http://127.0.0.1:{ports['child_classify']}/classify",
            json={"model": "rm", "input": batch, "use_activation": False},
        )
        r.raise_for_status()
        wire_bytes["child_classify"] += len(r.content)
        return [d["probs"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]

    async def embed(batch: list[list[int]]) -> list[list[float]]:
        r = await client.post(
            f"http://127.0.0.1:{ports['child_embed']}/v1/embeddings",
            json={"model": "rm", "input": batch, "encoding_format": "base64", "use_activation": False},
        )
        r.raise_for_status()
        wire_bytes["child_embed"] += len(r.content)
        rows = sorted(r.json()["data"], key=lambda d: d["index"])
        hidden = torch.stack(
            [torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32) for d in rows]
        )
        return (hidden @ w_score.T).tolist()

    modes = {"inproc": inproc, "child_classify": classify, "child_embed": embed}

    async def run(fn: Any, items: list[list[int]]) -> tuple[float, list[list[float]]]:
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def chunk(i: int) -> list[list[float]]:
            async with sem:
                return await fn(items[i : i + CHUNK])

        t = time.perf_counter()
        parts = await asyncio.gather(*(chunk(i) for i in range(0, len(items), CHUNK)))
        return time.perf_counter() - t, [x for p in parts for x in p]

    async def main() -> dict[str, Any]:
        ref = torch.tensor(data["ref"])
        exact = {}
        for name, fn in modes.items():  # round 0: warm-up, and exactness against the torch engine
            for wl in work:
                _, out = await run(fn, work[wl][0])
            _, out = await run(fn, work["grpo"][1][:16])
            exact[name] = (torch.tensor(out) - ref).abs().max().item()
        for k in wire_bytes:
            wire_bytes[k] = 0
        times: dict[str, dict[str, list[float]]] = {wl: {m: [] for m in modes} for wl in work}
        for r in range(1, rounds + 1):
            order = list(modes) if r % 2 else list(reversed(modes))
            for wl in work:
                for m in order:
                    dt, _ = await run(modes[m], work[wl][r])
                    times[wl][m].append(dt)
                    print(f"round {r} {wl:8s} {m:15s} {len(work[wl][r]) / dt:6.1f} items/s", flush=True)
        return {"times": times, "exact": exact}

    try:
        res = asyncio.run(main())
    finally:
        llm.shutdown()
    n_items = {wl: len(work[wl][1]) for wl in work}
    lines = [
        "# How hydra-rm drives vLLM: in-process vs managed child, classifier vs hidden state (CPU)",
        "",
        f"`.venv/bin/python bench/vllm_engine_choice.py --rounds {rounds} --prompts {n_items['grpo'] // 8} "
        f"--distinct {n_items['distinct']}`; "
        f"vllm-cpu 0.32.0, Qwen2-style K=4 (hidden 256, 4 layers), fp32, prefix caching on; batches of "
        f"{CHUNK} items, {IN_FLIGHT} in flight, the same token ids for every mode; modes alternate within each "
        f"round, fresh texts each round. Load: `{os.popen('uptime').read().strip()}`.",
        "",
        "| workload | mode | items/s (mean +- se) | ratio to child_classify, paired (mean +- se) |",
        "|---|---|---:|---:|",
    ]
    for wl, per_mode in res["times"].items():
        base = per_mode["child_classify"]
        for m, ts in per_mode.items():
            rates = [n_items[wl] / t for t in ts]
            ratios = [b / t for b, t in zip(base, ts, strict=True)]
            se = statistics.stdev(rates) / len(rates) ** 0.5 if len(rates) > 1 else 0.0
            rse = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
            lines.append(
                f"| {wl} ({n_items[wl]}) | {m} | {statistics.mean(rates):.1f} +- {se:.1f} | "
                f"{statistics.mean(ratios):.3f} +- {rse:.3f} |"
            )
    lines += [
        "",
        "| mode | start-up s | max abs diff to the torch engine (16 GRPO items) | response bytes per item |",
        "|---|---:|---:|---:|",
    ]
    total = sum(n_items.values()) * rounds
    for m in modes:
        b = f"{wire_bytes[m] / total:.0f}" if m in wire_bytes else "(no HTTP)"
        lines.append(f"| {m} | {startup[m]:.1f} | {res['exact'][m]:.2e} | {b} |")
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def cli() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=24, help="GRPO prompts (x8 responses) per round")
    ap.add_argument("--distinct", type=int, default=192, help="distinct items per round")
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm-engine-choice-cpu.md")
    args = ap.parse_args()
    if args.measure is not None:
        measure(args.measure, args.rounds, args.out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="vllm-choice-"))
    prepare(tmp, args.rounds, args.prompts, args.distinct)
    subprocess.run(
        [str(VLLM_PY), __file__, "--measure", str(tmp / "work.json"), "--rounds", str(args.rounds),
         "--out", str(args.out)],
        check=True,
    )  # fmt: skip


if __name__ == "__main__":
    cli()
