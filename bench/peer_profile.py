"""Where hydra-rm's and vLLM's time goes on the same items, in-process (no HTTP): what to fix first.

The model and workloads are bench/peer_vllm.py's (Qwen2-style K=4, hidden 256, 4 layers; GRPO 24x8 and
192 distinct items, prompts 300-700 tokens). hydra-rm variants run in this process, alternating within
each round on the same items (medians of the rounds):
- `plan`: `engine.score(items)` at the defaults (length-sorted, 2,048-token budget, 10% padding cap,
  prefix sharing within a batch);
- `unpadded`: every item alone (no padding at all; one forward per item);
- `eager`: `plan` with eager attention instead of sdpa;
- `one thread`: `plan` with 1 torch thread instead of torch's default;
- `compiled`: `plan` with the decoder under `torch.compile(dynamic=True)` (compile time reported apart).
vLLM runs offline (`LLM(...).classify(texts)`, its own venv, same model and texts) as served, and with
`enforce_eager=True` (no torch.compile), to see what compiling contributes.

hydra-rm runs with OpenMP's default wait policy, as `hydra-rm serve` does (PASSIVE is the operator's choice).

Usage: `python bench/peer_profile.py [--rounds 3] [--no-vllm]`; writes bench/results/peer-profile-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vllm_part(spec_path: Path) -> None:
    """Runs under .venv-vllm: each config loads once, then classifies every workload `rounds` times."""
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    os.environ.update({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"})
    from vllm import LLM

    spec = json.loads(spec_path.read_text())
    out: dict[str, Any] = {}
    configs = {
        "vLLM (as served)": {},
        "vLLM enforce_eager": {"enforce_eager": True},
    }
    for name, extra in configs.items():
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"enable_prefix_caching": True, **extra}
        llm = LLM(
            model=spec["model"],
            runner="pooling",
            convert="classify",
            dtype="float32",
            max_model_len=2048,
            pooler_config={"use_activation": False},
            **kw,
        )
        load = time.perf_counter() - t0
        llm.classify(spec["warm"], use_tqdm=False)
        times: dict[str, list[float]] = {}
        for r in range(spec["rounds"]):
            for load_name, rounds in spec["loads"].items():
                texts = rounds[r]
                t0 = time.perf_counter()
                llm.classify(texts, use_tqdm=False)
                times.setdefault(load_name, []).append(time.perf_counter() - t0)
        out[name] = {"load_s": load, "times": times}
        del llm
        import gc

        gc.collect()
    print("VLLM_RESULT " + json.dumps(out), flush=True)


def timed(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--vllm-part", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.vllm_part:
        vllm_part(args.vllm_part)
        return

    import torch
    from transformers import AutoTokenizer

    from bench.peer_vllm import PROMPT_TOKENS, VLLM_PYTHON, build_peer_model
    from bench.prefix_bench import grpo_texts
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from model_store.tokenization import Item
    from scoring.engine import ScoringEngine
    from scoring.settings import Settings

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="hydra-peer-profile-"))
    model_dir = build_peer_model(tmp / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    loads = {
        "grpo": [
            grpo_texts(tok, 1000 * (r + 1), 24, 8, prompt_tokens=PROMPT_TOKENS) for r in range(args.rounds)
        ],
        "distinct": [
            grpo_texts(tok, 1000 * (r + 1) + 1, 192, 1, shared=False, prompt_tokens=PROMPT_TOKENS)
            for r in range(args.rounds)
        ],
    }
    rm = load_reward_model(str(model_dir), ModelStore(tmp / "store"))
    engine = ScoringEngine(rm, policy=Settings().batch_policy())
    engine.warmup()
    default_threads = torch.get_num_threads()
    rows: dict[str, dict[str, list[float]]] = {}
    tokens: dict[str, dict[str, float]] = {}
    record: list[tuple[int, int]] = []  # (padded, real) per encoder pass
    plain = engine.heads.forward_padded  # what the plain and the shared-prefix passes call

    def counting(batch: Any) -> Any:
        n = [e.n_tokens for e in batch]
        record.append((max(n) * len(n), sum(n)))
        return plain(batch)

    engine.heads.forward_padded = counting  # type: ignore[method-assign]
    for load_name, rounds in loads.items():
        enc = [[engine.encode(Item(text=t)) for t in texts] for texts in rounds]
        state = {"r": 0}

        def plan(e: list[Any] = enc, s: dict = state) -> Any:
            return engine.score_encoded(e[s["r"]])

        def unpadded(e: list[Any] = enc, s: dict = state) -> Any:
            return [engine.forward([x]) for x in e[s["r"]]]

        def eager(e: list[Any] = enc, s: dict = state) -> Any:
            engine.model.set_attn_implementation("eager")
            try:
                return engine.score_encoded(e[s["r"]])
            finally:
                engine.model.set_attn_implementation("sdpa")

        def one_thread(e: list[Any] = enc, s: dict = state) -> Any:
            torch.set_num_threads(1)
            try:
                return engine.score_encoded(e[s["r"]])
            finally:
                torch.set_num_threads(default_threads)

        fns = {"plan": plan, "unpadded": unpadded, "eager": eager, "one thread": one_thread}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.rounds):
            state["r"] = r
            for k, f in fns.items():
                record.clear()
                engine.prefix.cache.clear()  # same texts in every variant: no prompt from the one before
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
                if r == 0:
                    tokens.setdefault(load_name, {})[k] = sum(p for p, _ in record)
                    tokens[load_name]["real " + k] = sum(x for _, x in record)
                print(f"{load_name} round {r} {k:10s} {times[k][-1]:.2f} s", flush=True)
        rows[load_name] = times
    compile_s = None
    if not args.no_compile:
        decoder = engine.model.model
        t0 = time.perf_counter()
        engine.model.model = torch.compile(decoder, dynamic=True)
        for rounds in loads.values():  # first calls compile
            engine.score_encoded([engine.encode(Item(text=t)) for t in rounds[0][:8]])
        compile_s = time.perf_counter() - t0
        for load_name, rounds in loads.items():
            enc = [[engine.encode(Item(text=t)) for t in texts] for texts in rounds]
            for r in range(args.rounds):
                engine.prefix.cache.clear()
                t0 = time.perf_counter()
                engine.score_encoded(enc[r])
                rows[load_name].setdefault("compiled", []).append(time.perf_counter() - t0)
                print(f"{load_name} round {r} compiled   {rows[load_name]['compiled'][-1]:.2f} s", flush=True)
        engine.model.model = decoder

    vllm: dict[str, Any] = {}
    if not args.no_vllm:
        spec = tmp / "spec.json"
        spec.write_text(
            json.dumps(
                {"model": str(model_dir), "rounds": args.rounds, "loads": loads, "warm": loads["grpo"][0][:8]}
            )
        )
        drop = ("PYTHONPATH", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")  # vLLM at its own defaults
        env = {k: v for k, v in os.environ.items() if k not in drop}
        proc = subprocess.run(
            [str(VLLM_PYTHON), __file__, "--vllm-part", str(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"vLLM part failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        vllm = json.loads(line.removeprefix("VLLM_RESULT "))

    n = {k: len(v[0]) for k, v in loads.items()}
    lines = [
        "# Profile: hydra-rm's engine vs vLLM's, in-process, same items (cpu)",
        "",
        f"Command: `python bench/peer_profile.py --rounds {args.rounds}`  ",
        f"Model and workloads: bench/peer_vllm.py's. torch {torch.__version__}, default {default_threads} threads, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}.  ",
        f"**Load average** at start {' '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine: hydra variants alternate within "
        "rounds; vLLM runs after them, in its own process).",
        "",
        "| engine / variant | workload | median s | items/s | vs hydra plan | padded tokens | real tokens | "
        "us / padded token | rounds (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for load_name, times in rows.items():
        base = statistics.median(times["plan"])
        for k, ts in times.items():
            med = statistics.median(ts)
            padded = tokens[load_name].get(k)
            real = tokens[load_name].get("real " + k)
            per = f"{1e6 * med / padded:.1f}" if padded else "-"
            lines.append(
                f"| hydra {k} | {load_name} | {med:.2f} | {n[load_name] / med:.1f} | {base / med:.2f}x | "
                f"{padded or '-'} | {real or '-'} | {per} | {', '.join(f'{t:.2f}' for t in ts)} |"
            )
        for name, res in vllm.items():
            ts = res["times"][load_name]
            med = statistics.median(ts)
            lines.append(
                f"| {name} | {load_name} | {med:.2f} | {n[load_name] / med:.1f} | {base / med:.2f}x | - | - | - | "
                f"{', '.join(f'{t:.2f}' for t in ts)} |"
            )
    lines.append("")
    if compile_s is not None:
        lines.append(f"hydra `torch.compile(dynamic=True)` first calls (compile): {compile_s:.1f} s.  ")
    for name, res in vllm.items():
        lines.append(f"{name}: engine load {res['load_s']:.1f} s.  ")
    out = args.out or ROOT / "bench" / "results" / "peer-profile-cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
