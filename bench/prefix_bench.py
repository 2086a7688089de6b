"""Shared-prefix scoring on a GRPO-shaped workload: sharing on vs off, same items, one run.

Workload (issue 12): 48 prompts x G=8 responses, prompts 300-800 tokens, responses 20-300 tokens,
sent as full texts (what OpenRLHF's `/get_reward` carries), scored by a Llama-style model of
hidden 256 and 4 layers (the embedded default's recipe, max_length raised to 2,048). A second
workload has no shared prompts at all (192 distinct prompts), where sharing must cost nothing.

Sections (all alternate on/off within each round, so drift on the shared machine hits both alike;
medians of the rounds and the ratio of medians are reported):
- batching: how suffixes are batched against a cached prefix (in-process, 12 prompts x 8).
- min_shared: prefix lengths 8-128 with short responses, sharing forced on vs off: where it pays.
- job: the batch job (`ScoreJob`, JSONL in and out) on all items, HYDRA_RM_PREFIX_SHARING on vs off.
- http: `/get_reward`, one sample per request, at 32 and 128 clients, one server per setting.

Usage: `python bench/prefix_bench.py [--rounds 3] [--sections batching,min_shared,job,http]`;
writes bench/results/prefix-<device>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS, GROUP = 48, 8
DISTINCT = 192  # items of the no-shared-prompt workload (half the GRPO count: the machine is shared)
MODES = ("off", "one", "group_padded", "group_sorted", "cross_sorted")


def _words() -> list[str]:
    from model_store.default_model import corpus_path

    return corpus_path().read_text().split()


def _text_of(tok: Any, words: list[str], rng: random.Random, n_tokens: int) -> str:
    """Random corpus words, cut where the text first reaches `n_tokens` tokens (BOS/EOS included)."""
    pool = [rng.choice(words) for _ in range(n_tokens)]  # a word is >= 1 token
    lo, hi = 1, len(pool)
    while lo < hi:  # fewest words reaching n_tokens
        mid = (lo + hi) // 2
        if len(tok(" ".join(pool[:mid]))["input_ids"]) >= n_tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(pool[:lo])


def grpo_texts(
    tok: Any,
    seed: int,
    prompts: int,
    group: int,
    shared: bool = True,
    prompt_tokens: tuple[int, int] = (300, 800),
) -> list[str]:
    """`prompts` x `group` full texts; with shared=False every item gets its own prompt."""
    rng, words = random.Random(seed), _words()
    texts = []
    for _ in range(prompts):
        prompt = _text_of(tok, words, rng, rng.randint(*prompt_tokens))
        for _ in range(group):
            p = prompt if shared else _text_of(tok, words, rng, rng.randint(*prompt_tokens))
            texts.append(p + "\n" + _text_of(tok, words, rng, rng.randint(20, 300)))
    return texts  # in the order a GRPO trainer sends them: each prompt's G responses together


def timed(fns: dict[str, Callable[[], Any]], rounds: int, warm: bool = True) -> dict[str, list[float]]:
    """Seconds per call, the callables alternating within each round (one warm-up call each first)."""
    for f in fns.values() if warm else ():
        f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
            print(f"  round {r} {k:14s} {out[k][-1]:.2f} s", flush=True)
    return out


def build_model(tmp: Path, hidden: int, layers: int) -> Path:
    from model_store.default_model import build_default_model
    from model_store.manifest import RewardManifest

    model_dir = build_default_model(tmp / "model", hidden_size=hidden, num_layers=layers)
    manifest = RewardManifest.read(model_dir)
    assert manifest is not None
    manifest.max_length = 2048  # prompts of 800 + responses of 300 tokens must fit untruncated
    manifest.write(model_dir)
    return model_dir


# -- sections ---------------------------------------------------------------------------------------
def section_batching(engine: Any, tok: Any, rounds: int) -> dict[str, Any]:
    from scoring.engine import Item
    from scoring.prefix import PrefixScorer

    texts = grpo_texts(tok, seed=1, prompts=12, group=GROUP)
    items = [engine.encode(Item(text=t)) for t in texts]
    lengths = [e.n_tokens for e in items]

    def off() -> list[Any]:
        out: list[Any] = [None] * len(items)
        for idxs in engine.policy.plan(lengths):  # 2,048-token budget, 10% padding cap on CPU
            for i, s in zip(idxs, engine.forward_padded([items[i] for i in idxs]), strict=True):
                out[i] = s
        return out

    scorers = {m: PrefixScorer(engine, suffix_batching=m, max_padding=0.1) for m in MODES[1:]}
    fns: dict[str, Callable[[], Any]] = {"off": off}
    fns.update({m: (lambda s=s: s.forward(items)) for m, s in scorers.items()})
    ref = [s.rewards for s in off()]
    diff = max(
        abs(a - b)
        for s in scorers.values()
        for got, want in zip(s.forward(items), ref, strict=True)
        for a, b in zip(got.rewards, want, strict=True)
    )
    return {"times": timed(fns, rounds), "n": len(items), "diff": diff, "tokens": sum(lengths)}


def section_min_shared(engine: Any, rounds: int) -> dict[str, Any]:
    from scoring.engine import EncodedItem
    from scoring.prefix import PrefixScorer

    rng = random.Random(2)
    vocab = engine.model.config.vocab_size
    rows = {}
    for plen in (8, 16, 32, 64, 128):
        items = []
        for _ in range(16):
            prompt = [rng.randrange(3, vocab) for _ in range(plen)]
            for _ in range(GROUP):
                ids = prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(20, 60))]
                items.append(EncodedItem(ids, None, False, len(ids)))
        on = PrefixScorer(engine, min_shared=1, max_padding=0.1)
        off = PrefixScorer(engine, enabled=False, max_padding=0.1)
        print(f"min_shared: prefix {plen}", flush=True)
        rows[plen] = timed(
            {"off": lambda o=off, i=items: o.forward(i), "on": lambda o=on, i=items: o.forward(i)}, rounds
        )
    return rows


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return path


def section_job(model_dir: Path, tmp: Path, tok: Any, rounds: int, loads: set[str]) -> dict[str, Any]:
    """The JSONL batch job end to end (parse, tokenize, plan, score, write), sharing on vs off."""
    from jobs.local import ScoreJob
    from scoring.engine import Item
    from scoring.settings import Settings, build_engine

    engines = {
        mode: build_engine(Settings(model=str(model_dir), store_root=tmp / "store", prefix_sharing=mode))
        for mode in ("off", "auto")
    }
    out: dict[str, Any] = {"lines": []}
    for name, shared in (("GRPO (48 prompts x 8)", True), (f"no shared prompts ({DISTINCT} prompts)", False)):
        if ("grpo" if shared else "distinct") not in loads:
            continue
        texts = (
            grpo_texts(tok, seed=3, prompts=PROMPTS, group=GROUP)
            if shared
            else grpo_texts(tok, seed=4, prompts=DISTINCT, group=1, shared=False)
        )
        src = write_jsonl(tmp / f"in-{shared}.jsonl", texts)

        def run(mode: str, src: Path = src, shared: bool = shared) -> Path:
            dst = tmp / f"out-{shared}-{mode}.jsonl"
            ScoreJob(engines[mode], src, dst).run(restart=True, progress_bar=False)
            return dst

        print(f"job: {name}", flush=True)
        times = timed({"off": lambda: run("off"), "on": lambda: run("auto")}, rounds, warm=False)
        rewards = {}
        for mode in ("off", "auto"):
            with open(tmp / f"out-{shared}-{mode}.jsonl") as f:
                rewards[mode] = [json.loads(line)["heads"] for line in f]
        diff = max(
            abs(a - b)
            for x, y in zip(rewards["off"], rewards["auto"], strict=True)
            for a, b in zip(x.values(), y.values(), strict=True)
        )
        n = len(texts)
        ids = [engines["off"].encode(Item(text=t)).input_ids for t in texts]
        from scoring.batching import plan_prefix_groups

        saved = plan_prefix_groups(ids).tokens_saved / sum(map(len, ids))
        ratio = _med(times["off"]) / _med(times["on"])
        out[name] = {"times": times, "ratio": ratio}
        out["lines"] += [
            f"## Batch job: {name}, {n} items, {sum(map(len, ids))} tokens",
            "",
            f'`ScoreJob` on a JSONL of `{{"text": prompt + response}}` lines (chunks of 512 lines), '
            f"HYDRA_RM_PREFIX_SHARING=off vs auto. Tokens the plan does not compute: {saved:.0%}. Largest "
            f"|reward difference| on vs off: {diff:.1e}.",
            "",
            "| sharing | median s | items/s | rounds (s) |",
            "|---|---:|---:|---|",
            *(
                f"| {k} | {_med(v):.2f} | {n / _med(v):.1f} | {', '.join(f'{t:.1f}' for t in v)} |"
                for k, v in times.items()
            ),
            "",
            f"**on / off: {ratio:.2f}x** (goal {'>= 2.5x' if shared else '>= 0.97x'}: "
            f"{'met' if ratio >= (2.5 if shared else 0.97) else 'not met'}).",
            "",
        ]
    return out


def section_http(
    model_dir: Path, tmp: Path, tok: Any, rounds: int, threads: int, loads: set[str]
) -> dict[str, Any]:
    """`/get_reward`, one sample per request (OpenRLHF's shape), one server per setting."""
    from service_bench import drive, free_port, start, stop

    workloads = {
        "grpo": grpo_texts(tok, seed=3, prompts=PROMPTS, group=GROUP),
        "distinct": grpo_texts(tok, seed=4, prompts=DISTINCT, group=1, shared=False),
    }
    bodies_of = {
        k: [{"query": [t], "prompts": [""], "labels": [None]} for t in v] for k, v in workloads.items()
    }
    bodies = bodies_of["grpo"]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HYDRA_RM_STORE_ROOT=str(tmp / "store"),
        HYDRA_RM_LOG_LEVEL="warning",
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
    )
    urls, procs = {}, []
    out: dict[str, Any] = {"lines": []}
    try:
        for mode in ("off", "auto"):
            port = free_port()
            cmd = [sys.executable, "-m", "cli", "serve", "--model", str(model_dir), "--port", str(port)]
            procs.append(start(cmd, dict(env, HYDRA_RM_PREFIX_SHARING=mode), port))
            urls[mode] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            asyncio.run(drive(url, "/get_reward", bodies[:16], 16, 4))
        rows = []
        for c, load in [x for x in ((32, "grpo"), (128, "grpo"), (32, "distinct")) if x[1] in loads]:
            bodies = bodies_of[load]
            res: dict[str, list[Any]] = {"off": [], "auto": []}
            for r in range(rounds):
                for mode, url in urls.items():
                    x = asyncio.run(drive(url, "/get_reward", bodies, len(bodies), c))
                    res[mode].append(x)
                    print(
                        f"  http c={c} round {r} {mode:4s} {x.items_per_s:.1f} items/s errors {x.errors}",
                        flush=True,
                    )
            med = {m: _med([x.items_per_s for x in v]) for m, v in res.items()}
            errs = sum(x.errors for v in res.values() for x in v)
            p50 = {m: _med([x.p50_ms for x in v]) for m, v in res.items()}
            rows.append((c, load, med, p50, errs, res))
            out[c, load] = med["auto"] / med["off"]
    finally:
        for proc in procs:
            stop(proc)
    out["lines"] += [
        "## HTTP: `/get_reward`, one sample per request",
        "",
        "Two servers (`python -m cli serve`, HYDRA_RM_PREFIX_SHARING=off / auto), closed-loop clients "
        "(bench/service_bench.py's asyncio client, in this process, on the same machine); items/s over the "
        "whole run, median of the rounds, runs alternating between the servers. `grpo`: 48 prompts x 8 "
        "responses, each prompt's responses sent one after another (as a trainer sends a group); "
        f"`distinct`: {DISTINCT} items with prompts of their own (nothing to share).",
        "",
        "| clients | workload | off items/s | on items/s | on / off | off p50 ms | on p50 ms | rounds off / on "
        "| errors |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c, load, med, p50, errs, res in rows:
        per = " / ".join(", ".join(f"{x.items_per_s:.1f}" for x in res[m]) for m in ("off", "auto"))
        out["lines"].append(
            f"| {c} | {load} | {med['off']:.1f} | {med['auto']:.1f} | {med['auto'] / med['off']:.2f}x | "
            f"{p50['off']:.0f} | {p50['auto']:.0f} | {per} | {errs} |"
        )
    out["lines"].append("")
    if (32, "grpo") in out:
        ratio = out[32, "grpo"]
        out["lines"].append(
            f"**GRPO, on / off at 32 clients: {ratio:.2f}x** (goal >= 2x: {_met(ratio >= 2)})."
        )
    if (32, "distinct") in out:
        ratio = out[32, "distinct"]
        out["lines"].append(
            f"**Nothing to share, on / off: {ratio:.2f}x** (goal >= 0.97x: {_met(ratio >= 0.97)})."
        )
    out["lines"].append("")
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


# -- report -----------------------------------------------------------------------------------------
def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def report(args: argparse.Namespace, device: str, res: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        f"# Shared-prefix scoring ({device})",
        "",
        f"Command: `python bench/prefix_bench.py --rounds {args.rounds} --threads {args.threads} "
        f"--sections {args.sections} --loads {args.loads}`  ",
        f"Model: Llama-style decoder (the embedded default's recipe), hidden {args.hidden}, {args.layers} layers, "
        f"K=4 heads, fp32, max_length 2,048. torch {env['torch']}, {env['threads']} intra-op threads, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}.",
        "",
        f"**The machine was shared with other jobs** (load average at start {env['load'][0]:.1f}, "
        f"at end {env.get('load_end', (0,))[0]:.1f}): absolute items/s drift between rounds, so every "
        "comparison alternates its variants within each round and reports the median of "
        f"{args.rounds} rounds and the ratio of medians.",
        "",
    ]
    if "batching" in res:
        b = res["batching"]
        off = _med(b["times"]["off"])
        lines += [
            f"## How suffixes are batched ({b['n']} items = 12 prompts x {GROUP}, {b['tokens']} tokens, in-process)",
            "",
            "`off`: no sharing, length-sorted batches under the 2,048 token budget and the 10% padding cap "
            "(what the service does without sharing). The others encode each prompt once, then run the "
            "suffixes against its cached keys/values: `one` one suffix per forward; `group_padded` all of a "
            "group's suffixes padded into one forward; `group_sorted` a group's suffixes length-sorted and "
            "cut at the 10% padding cap; `cross_sorted` suffixes of different groups batched together by "
            f"length, shorter prefixes padded inside the cache. Largest |reward difference| vs `off` over "
            f"all modes: {b['diff']:.1e}.",
            "",
            "| suffix batching | median s | items/s | vs off |",
            "|---|---:|---:|---:|",
        ]
        for m, ts in b["times"].items():
            lines.append(f"| {m} | {_med(ts):.2f} | {b['n'] / _med(ts):.1f} | {off / _med(ts):.2f}x |")
        lines.append("")
    if "min_shared" in res:
        lines += [
            "## Where sharing starts to pay (16 prompts x 8, responses 20-60 tokens, sharing forced on)",
            "",
            "| prefix tokens | off s | on s | on vs off |",
            "|---:|---:|---:|---:|",
        ]
        for plen, ts in res["min_shared"].items():
            lines.append(
                f"| {plen} | {_med(ts['off']):.3f} | {_med(ts['on']):.3f} | {_med(ts['off']) / _med(ts['on']):.2f}x |"
            )
        lines.append("")
    for key in ("job", "http"):
        if key in res:
            lines += res[key]["lines"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sections", default="batching,min_shared,job,http")
    ap.add_argument("--loads", default="all", help="workloads of the job/http sections: grpo,distinct")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads, here and in the servers (1: on a busy shared host 2 threads can be "
        "20x slower, DESIGN.md; the thread default itself is another measurement; 0: the default, "
        "torch's own count, nothing pinned)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine

    sections = args.sections.split(",")
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="hydra-prefix-bench-"))
    model_dir = build_model(tmp, args.hidden, args.layers)
    engine = ScoringEngine(load_reward_model(str(model_dir), ModelStore(tmp / "store")))
    engine.warmup()
    res: dict[str, Any] = {}
    if "batching" in sections:
        res["batching"] = section_batching(engine, engine.tokenizer, args.rounds)
    if "min_shared" in sections:
        res["min_shared"] = section_min_shared(engine, args.rounds)
    loads = {"grpo", "distinct"} if args.loads == "all" else set(args.loads.split(","))
    if "job" in sections:
        res["job"] = section_job(model_dir, tmp, engine.tokenizer, args.rounds, loads)
    if "http" in sections:
        res["http"] = section_http(model_dir, tmp, engine.tokenizer, args.rounds, args.threads, loads)
    env["load_end"] = os.getloadavg()
    device = (
        "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name().replace(" ", "-").lower()
    )
    out = args.out or ROOT / "bench" / "results" / f"prefix-{device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args, device, res, env))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
