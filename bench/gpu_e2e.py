"""First-GPU-session benchmark: a Llama-3-8B-shaped reward model, end to end, with nothing downloaded.

Builds a randomly initialised Llama-3-8B-shaped sequence-classification model (hidden 4096, 32
layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, K=4 heads) in bf16 directly on the
GPU, with the repo's locally trained tokenizer (random weights: the numbers measure speed, not
rewards). One run, side by side:

1. padded vs length-sorted: the same mixed-length items in fixed batches of 32 in arrival order
   (what a naive server does) vs the engine's own plan (length-sorted, token budget, padding cap);
2. prefix sharing on vs off on a GRPO-shaped workload (prompts x G=8 responses, the prompt text
   repeated in every item as OpenRLHF sends it), when this build's engine has a `prefix_sharing`
   option; otherwise the section says "not available in this build";
3. the service end to end (`python -m cli serve` on the saved model) at 32 closed-loop clients,
   one sample per `/get_reward` request (sharing on and off where available).

Usage: `python bench/gpu_e2e.py` on a CUDA machine (`make bench-gpu`); writes
bench/results/gpu-<device name>.md. `--small` runs a tiny shape on CPU in seconds, so CI can check
that the script runs (tests/bench/test_gpu_e2e.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.service_bench import drive, free_port, start, stop  # noqa: E402
from model_store.default_model import corpus_path, train_tokenizer  # noqa: E402
from model_store.loader import RewardModel  # noqa: E402
from model_store.manifest import RewardManifest  # noqa: E402
from scoring.batching import BatchPolicy, padded_tokens  # noqa: E402
from scoring.engine import EncodedItem, Item, ScoringEngine  # noqa: E402

# Llama-3-8B's shape (config.json of meta-llama/Meta-Llama-3-8B), and a tiny one for --small.
LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=None,  # the tokenizer's
    max_position_embeddings=2048,
    rope_theta=500000.0,
)
K = 4
WORDS = (
    "the reward model scores each response to a prompt and several linear heads share one encoder so the "
    "policy receives the minimum which resists over optimisation of a flawed proxy while disagreement "
    "between heads measures uncertainty about quality helpfulness and harm"
).split()


@dataclass
class Row:
    section: str
    schedule: str
    items: int
    tokens: int  # real tokens of the items (the work a caller asked for)
    computed: int  # tokens the encoder actually ran (padding included; prefix counted once if shared)
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# -- model ------------------------------------------------------------------------------------------
def build_model(dest: Path, shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> RewardModel:
    """Random weights built on the target device (an 8B init on the CPU would take minutes)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = train_tokenizer(corpus_path().read_text().splitlines())
    vocab = shape["vocab_size"] or len(tokenizer)
    config = LlamaConfig(
        **{**shape, "vocab_size": vocab},
        num_labels=K,
        id2label={i: f"head_{i}" for i in range(K)},
        label2id={f"head_{i}": i for i in range(K)},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForSequenceClassification._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    manifest = RewardManifest.default_for(K, pooling="last_token", max_length=4096)
    return RewardModel(
        model=model,
        tokenizer=tokenizer,
        manifest=manifest,
        name="llama3-8b-shape" if shape is LLAMA3_8B else "small",
        version="random",
        path=dest,
        info={"model_type": "llama", "architecture": type(model).__name__, "attn_implementation": "sdpa"},
    )


def save_model(rm: RewardModel, dest: Path) -> None:
    """What the service loads: safetensors + tokenizer + manifest, like any store checkpoint."""
    dest.mkdir(parents=True, exist_ok=True)
    rm.model.save_pretrained(dest, safe_serialization=True)
    rm.tokenizer.save_pretrained(dest)
    rm.manifest.write(dest)


# -- workloads --------------------------------------------------------------------------------------
def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def mixed_texts(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """Independent prompt+response texts of random length, in random (arrival) order."""
    rng = random.Random(seed)
    return [f"{words(rng, lo // 4, hi // 4)}\n{words(rng, lo, hi)}" for _ in range(n)]


def grpo_texts(prompts: int, group: int, p_words: tuple[int, int], r_words: tuple[int, int]) -> list[str]:
    """G responses per prompt, each sent as its own full text; group members arrive together."""
    rng = random.Random(1)
    out = []
    for _ in range(prompts):
        prompt = words(rng, *p_words)
        out.extend(f"{prompt}\n{words(rng, *r_words)}" for _ in range(group))
    return out


def shared_prefix_tokens(encoded: list[EncodedItem]) -> int:
    """Tokens a perfect prefix cache would skip: for each run of items sharing a leading token run
    with the previous item, that run (the GRPO groups here are contiguous)."""
    saved = 0
    for a, b in zip(encoded, encoded[1:], strict=False):
        n = 0
        for x, y in zip(a.input_ids, b.input_ids, strict=False):
            if x != y:
                break
            n += 1
        saved += n
    return saved


# -- in-process measurements ------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Best of `repeats` after one warm-up run (first-shape allocations and autotuning excluded)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def padded_vs_sorted(engine: ScoringEngine, texts: list[str], repeats: int) -> list[Row]:
    enc = [engine.encode(Item(text=t)) for t in texts]
    tokens = sum(e.n_tokens for e in enc)
    arrival = [list(range(i, min(i + 32, len(enc)))) for i in range(0, len(enc), 32)]
    plan = engine.policy.plan([e.n_tokens for e in enc])

    def run(batches: list[list[int]]) -> None:
        for b in batches:
            engine.forward([enc[i] for i in b])

    rows = []
    for name, batches in (
        ("padded, arrival order, 32/batch", arrival),
        ("length-sorted (engine plan)", plan),
    ):
        computed = sum(padded_tokens([enc[i].n_tokens for i in b]) for b in batches)
        rows.append(
            Row(
                "mixed lengths",
                name,
                len(enc),
                tokens,
                computed,
                timed(lambda b=batches: run(b), engine.device, repeats),
            )
        )
    return rows


def prefix_sharing(rm: RewardModel, policy: BatchPolicy, texts: list[str], repeats: int) -> list[Row]:
    """Sharing off vs on (`BatchPolicy.prefix_sharing`); "on" stays off where the engine's self-check
    refuses the architecture, and then raises rather than report a row that measured nothing."""
    rows = []
    for mode in ("off", "auto"):
        engine = ScoringEngine(rm, policy=replace(policy, prefix_sharing=mode == "auto"))
        if mode == "auto" and not engine.prefix.sharing:
            raise RuntimeError(
                f"prefix sharing refused by the engine's self-check on {type(rm.model).__name__}"
            )
        enc = [engine.encode(Item(text=t)) for t in texts]
        tokens = sum(e.n_tokens for e in enc)
        computed = tokens - (shared_prefix_tokens(enc) if mode == "auto" else 0)
        secs = timed(lambda e=engine, x=enc: e.score_encoded(x), engine.device, repeats)
        rows.append(Row("GRPO prefix sharing", f"sharing {mode}", len(enc), tokens, computed, secs))
    return rows


# -- service end to end -----------------------------------------------------------------------------
def service_e2e(
    model_dir: Path,
    texts: list[str],
    tokens: int,
    clients: int,
    device: str,
    dtype: str,
    sharing: bool,
    engine: str = "torch",
    tp: int = 1,
) -> list[Row]:
    """`hydra-rm serve` at `clients` closed-loop clients; on the vLLM engine (HYDRA_RM_ENGINE=vllm)
    "sharing" is vLLM's prefix caching (HYDRA_RM_PREFIX_SHARING turns it on and off)."""
    bodies = [{"query": [t], "prompts": [""], "labels": [None]} for t in texts]
    rows = []
    for mode in ("off", "auto") if sharing or engine == "vllm" else (None,):
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            HYDRA_RM_DEVICE=device,
            HYDRA_RM_DTYPE=dtype,
            HYDRA_RM_STORE_ROOT=str(model_dir.parent / "store"),
            HYDRA_RM_LOG_LEVEL="warning",
            HYDRA_RM_ENGINE=engine,
            HYDRA_RM_VLLM_TENSOR_PARALLEL_SIZE=str(tp),
        )
        if mode is not None:
            env["HYDRA_RM_PREFIX_SHARING"] = mode
        port = free_port()
        cmd = [sys.executable, "-m", "cli", "serve", "--model", str(model_dir), "--port", str(port)]
        proc = start(cmd, env, port, timeout_s=900)  # an 8B checkpoint takes a while to read and move
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(drive(url, "/get_reward", bodies[: min(len(bodies), clients)], 1, clients))  # warm-up
            res = asyncio.run(drive(url, "/get_reward", bodies, len(bodies), clients))
        finally:
            stop(proc, wait_s=60)
        if res.errors:
            raise RuntimeError(f"{res.errors} requests failed in the service run")
        what = "vLLM prefix caching" if engine == "vllm" else "sharing"
        name = f"{clients} clients, /get_reward x1" + (f", {what} {mode}" if mode else "")
        secs = len(bodies) / res.items_per_s
        rows.append(
            Row(
                "service end to end" if engine == "torch" else f"service end to end, vLLM engine (tp={tp})",
                f"{name} (p50 {res.p50_ms:.0f} ms, p99 {res.p99_ms:.0f} ms)",
                len(bodies),
                tokens,
                tokens,
                secs,
            )
        )
    return rows


def raw_vllm_e2e(model_dir: Path, texts: list[str], tokens: int, clients: int, dtype: str, tp: int) -> Row:
    """Raw vLLM `/classify` on the same checkpoint, started as hydra-rm starts its child: the ceiling
    the vLLM engine is measured against (issue 19's goal: >= 0.95x)."""
    from scoring.vllm_engine import LAUNCHER, find_vllm_python

    port = free_port()
    cmd = [
        str(find_vllm_python(None)), str(LAUNCHER), "--model", str(model_dir), "--served-model-name", "rm",
        "--host", "127.0.0.1", "--port", str(port), "--runner", "pooling", "--convert", "classify",
        "--pooler-config", '{"use_activation": false}', "--dtype", dtype, "--tensor-parallel-size", str(tp),
        "--enable-prefix-caching", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 1800
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("raw vLLM did not start")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        bodies = [{"model": "rm", "input": [t]} for t in texts]
        url = f"http://127.0.0.1:{port}"
        asyncio.run(drive(url, "/classify", bodies[:clients], 1, clients))
        res = asyncio.run(drive(url, "/classify", bodies, len(bodies), clients))
    finally:
        stop(proc, wait_s=60)
    name = f"{clients} clients, /classify x1, prefix caching on (p50 {res.p50_ms:.0f} ms, p99 {res.p99_ms:.0f} ms)"
    return Row(f"raw vLLM (tp={tp})", name, len(bodies), tokens, tokens, len(bodies) / res.items_per_s)


# -- report -----------------------------------------------------------------------------------------
def write_report(out: Path, meta: dict[str, str], rows: list[Row], notes: list[str]) -> None:
    lines = ["# GPU end to end: Llama-3-8B-shaped reward model (random weights), K=4", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "| section | schedule | items | real tokens | computed tokens | items/s | tokens/s | vs first row |",
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    first: dict[str, float] = {}
    for r in rows:
        base = first.setdefault(r.section, r.items_per_s)
        lines.append(
            f"| {r.section} | {r.schedule} | {r.items} | {r.tokens} | {r.computed} | "
            f"{r.items_per_s:.2f} | {r.tokens_per_s:.0f} | {r.items_per_s / base:.2f}x |"
        )
    lines += ["", *notes, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--small", action="store_true", help="tiny shape, few items: checks the script runs (CPU)"
    )
    ap.add_argument("--items", type=int, default=None, help="mixed-length items (default 512; --small 16)")
    ap.add_argument(
        "--prompts", type=int, default=None, help="GRPO prompts, G=8 each (default 48; --small 2)"
    )
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed runs per cell, best kept (default 2; --small 1)"
    )
    ap.add_argument("--no-service", action="store_true", help="skip the end-to-end service section")
    ap.add_argument(
        "--engines",
        default="torch",
        help="service engines to run, comma-separated: torch, vllm (HYDRA_RM_ENGINE; vllm also runs raw "
        "vLLM /classify beside it; needs `make vllm-env` with vLLM's CUDA build there)",
    )
    ap.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size (GPUs) for the vllm rows")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    on_cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda") if on_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    shape = SMALL if args.small else LLAMA3_8B
    if not on_cuda and not args.small:
        sys.exit("no CUDA device: the 8B shape needs a GPU; use --small to check the script on CPU")
    items = args.items or (16 if args.small else 512)
    prompts = args.prompts or (2 if args.small else 48)
    repeats = args.repeats or (1 if args.small else 2)
    # Word ranges for the local tokenizer's ~2.4 tokens per word (measured on these words): mixed
    # items ~25-900 tokens, GRPO prompts ~300-800 and responses ~20-300 tokens (the shape).
    mixed_range, p_words, r_words = (
        ((5, 40), (10, 30), (2, 10)) if args.small else ((8, 300), (125, 330), (8, 125))
    )
    group = 4 if args.small else 8

    tmp = Path(tempfile.mkdtemp(prefix="hydra-gpu-e2e-"))
    t0 = time.perf_counter()
    rm = build_model(tmp / "model", shape, dtype, device)
    build_s = time.perf_counter() - t0
    policy = BatchPolicy.resolve(str(device))
    engine = ScoringEngine(rm, policy=policy)
    print(f"built {rm.name} on {device} in {build_s:.1f}s; policy {policy}", flush=True)

    rows = padded_vs_sorted(engine, mixed_texts(items, *mixed_range), repeats)
    grpo = grpo_texts(prompts, group, p_words, r_words)
    grpo_tokens = sum(engine.encode(Item(text=t)).n_tokens for t in grpo)
    notes = []
    sharing = policy.prefix_sharing
    if sharing:
        try:
            rows += prefix_sharing(rm, policy, grpo, repeats)
        except RuntimeError as exc:
            sharing = False
            notes.append(f"- GRPO prefix sharing: {exc}.")
    saved = shared_prefix_tokens([engine.encode(Item(text=t)) for t in grpo])
    notes.append(
        f"- GRPO workload: {prompts} prompts x G={group}, {grpo_tokens} real tokens of which {saved} are a "
        f"repeated prefix ({saved / max(grpo_tokens, 1):.0%}): the most sharing can skip."
    )
    for r in rows:
        print(
            f"{r.section:22s} {r.schedule:36s} {r.items_per_s:8.2f} items/s {r.tokens_per_s:9.0f} tokens/s",
            flush=True,
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0.0
    del engine

    if not args.no_service:
        t0 = time.perf_counter()
        save_model(rm, tmp / "model")
        save_s = time.perf_counter() - t0
        del rm
        if on_cuda:
            torch.cuda.empty_cache()  # the service process loads its own copy
        dev_name, dt_name = ("cuda", "bfloat16") if on_cuda else ("cpu", "float32")
        n_before = len(rows)
        for eng in args.engines.split(","):
            rows += service_e2e(
                tmp / "model",
                grpo,
                grpo_tokens,
                args.clients,
                dev_name,
                dt_name,
                sharing,
                eng.strip(),
                args.tp,
            )
            if eng.strip() == "vllm":
                rows.append(raw_vllm_e2e(tmp / "model", grpo, grpo_tokens, args.clients, dt_name, args.tp))
        notes.append(f"- service: the GRPO items, one per request; checkpoint saved in {save_s:.1f}s.")
        for r in rows[n_before:]:
            print(f"{r.section:22s} {r.schedule:36s} {r.items_per_s:8.2f} items/s", flush=True)

    gpu = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    name = gpu.replace(" ", "-").lower() + ("-small" if args.small else "")
    out = args.out or ROOT / "bench" / "results" / f"gpu-{name}.md"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    cmd = "python bench/gpu_e2e.py" + (" --small" if args.small else "")
    if args.engines != "torch":
        cmd += f" --engines {args.engines} --tp {args.tp}"
    meta = {
        "device": f"{gpu} ({'bf16' if on_cuda else 'fp32'})",
        "shape": ", ".join(f"{k}={v}" for k, v in shape.items() if v is not None) + f", K={K}",
        "policy": f"token_budget={policy.token_budget}, max_batch_size={policy.max_batch_size}, "
        f"max_padding={policy.max_padding}",
        "software": f"torch {torch.__version__}, triton {triton_v}, python {platform.python_version()}",
        "build": f"random init on {device} in {build_s:.1f}s; peak GPU memory in-process {peak:.1f} GiB",
        "command": f"`{cmd}` (seeded workloads; best of {repeats} timed runs after a warm-up)",
    }
    if args.small:
        notes.append(
            "- --small: a tiny model on a shared CPU, to check the script runs; these numbers mean nothing."
        )
    write_report(out, meta, rows, notes)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
