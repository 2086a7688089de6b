"""hydra-rm vs vLLM, the peer a user would pick instead: one model, the same items, side by side.

Both servers run at their defaults on one Qwen2-style K=4 reward model (hidden 256, 4 layers, fp32,
random weights, max length 2,048): `hydra-rm serve --model DIR`, and vLLM's CPU build started as
issue 18 found it must be (`--runner pooling --convert classify --enable-prefix-caching`, raw logits).
Requests are one sample per POST, as OpenRLHF sends them: `/get_reward {"query": [text]}` for hydra-rm,
`/classify {"model": "rm", "input": [text]}` for vLLM (its `probs` are the K raw logits).

Workloads (full prompt+response texts, fresh ones every round so vLLM's prefix cache never sees a text
twice; both servers get the same texts within a round, in alternating order):
- grpo: 24 prompts x 8 responses, prompts 300-700 tokens, responses 20-300, each group sent together;
- distinct: 192 items, each with a prompt of its own (nothing to share);
- latency: 24 distinct items, one client (c=1).
32 closed-loop clients for the first two. Every round also scrapes both servers' /metrics: hydra-rm's
batches, padding and encoder-busy seconds, vLLM's prefix-cache hits.

Usage: `make bench-peer` (builds .venv-vllm on first use), or
`python bench/peer_vllm.py [--rounds 5] [--clients 32] [--b-env K=V ...] [--b-root DIR] [--no-vllm]`.
`--b-env` / `--b-root` add a second hydra-rm server (a setting, or another source tree) to every round:
the A/B of a change, measured beside vLLM. Writes bench/results/peer-vllm-<device>.md; everything below
its `NOTES` marker (the profile and the A/B history) is kept across re-runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ceiling_bench import BATCH_COUNTERS, Shape, build_qwen2, scrape  # noqa: E402
from bench.prefix_bench import grpo_texts  # noqa: E402
from bench.service_bench import Result, drive, free_port  # noqa: E402

NOTES = "<!-- NOTES: everything below this line is hand-written and kept when the bench re-runs -->"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
VLLM_COUNTERS = frozenset(
    {"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total"}
)
PROMPT_TOKENS = (300, 700)
HYDRA = "hydra-rm"
VLLM = "vLLM"
HYDRA_ON_VLLM = "hydra-rm on vLLM"  # hydra-rm serve with HYDRA_RM_ENGINE=vllm (issue 19's third column)


def build_peer_model(dest: Path, *, hidden: int = 256, layers: int = 4) -> Path:
    """ceiling_bench's Qwen2-style K=4 model, max length raised to 2,048 (prompts of 700 + responses of
    300 tokens fit untruncated; vLLM gets --max-model-len 2048)."""
    from model_store.manifest import RewardManifest

    model_dir = build_qwen2(dest, hidden=hidden, layers=layers)
    manifest = RewardManifest.read(model_dir)
    assert manifest is not None
    manifest.max_length = 2048
    manifest.write(model_dir)
    return model_dir


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Server:
    """One server process in its own process group (vLLM forks an engine-core process: the whole group
    is stopped), its log in a file (a pipe nobody reads fills and blocks a chatty server)."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log: Path
    cwd: Path = ROOT
    proc: subprocess.Popen | None = None
    startup_s: float = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> None:
        import httpx

        t0 = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up; its log {self.log}:\n{self.tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(
            f"{self.name} not ready after {timeout_s:.0f} s; its log {self.log}:\n{self.tail()}"
        )

    def tail(self, n: int = 3000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace") if self.log.exists() else ""

    def stop(self, wait_s: float = 20) -> None:
        """SIGTERM to the group, SIGKILL to whatever is left of it after `wait_s`."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the leader exited; sweep any child it left behind
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
        self.proc = None


def hydra_server(
    name: str, model_dir: Path, tmp: Path, extra_env: dict[str, str], root: Path = ROOT
) -> Server:
    """`hydra-rm serve --model DIR` at its defaults (+ `extra_env`), from the source tree `root`."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(root), HYDRA_RM_STORE_ROOT=str(tmp / f"store-{port}"))
    env.update(HYDRA_RM_LOG_LEVEL="warning", **extra_env)
    cmd = [sys.executable, "-m", "cli", "serve", "--model", str(model_dir), "--port", str(port)]
    return Server(name, cmd, env, port, "/readyz", tmp / f"{name}.log", cwd=root)


def vllm_server(model_dir: Path, tmp: Path) -> Server:
    """vLLM 0.32 CPU as issue 18 found it must be started (the `vllm` console script fails here)."""
    port = free_port()
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--served-model-name", "rm", "--runner", "pooling", "--convert", "classify", "--dtype", "float32"]
    cmd += ["--max-model-len", "2048", "--enable-prefix-caching"]
    cmd += ["--pooler-config", '{"use_activation": false}', "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(VLLM_ENV)
    return Server(VLLM, cmd, env, port, "/health", tmp / "vllm.log")


# -- requests --------------------------------------------------------------------------------------
def bodies_for(server: Server, texts: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The route and one body per sample: OpenRLHF's `/get_reward` shape, vLLM's `/classify`."""
    if server.name == VLLM:
        return "/classify", [{"model": "rm", "input": [t]} for t in texts]
    return "/get_reward", [{"query": [t], "prompts": [""], "labels": [None]} for t in texts]


def heads_of(server: Server, reply: dict[str, Any], k: int) -> list[float]:
    """The K per-head rewards of a one-sample reply."""
    if server.name == VLLM:
        return [float(x) for x in reply["data"][0]["probs"]]
    logs = reply["extra_logs"]
    return [float(logs[f"head_{i}"][0]) for i in range(k)]


def agreement(
    servers: list[Server], texts: list[str], k: int, reference: list[list[float]]
) -> dict[str, float]:
    """Largest |head reward - HF logits| per server over `texts`, one sample per request."""
    import httpx

    out = {}
    for s in servers:
        path, bodies = bodies_for(s, texts)
        worst = 0.0
        with httpx.Client(timeout=60) as client:
            for body, ref in zip(bodies, reference, strict=True):
                r = client.post(s.url + path, json=body)
                r.raise_for_status()
                got = heads_of(s, r.json(), k)
                worst = max(worst, *(abs(a - b) for a, b in zip(got, ref, strict=True)))
        out[s.name] = worst
    return out


def hf_reference(model_dir: Path, tok: Any, texts: list[str]) -> list[list[float]]:
    """The Hugging Face model's own logits, one text at a time (the tokenizer's own special tokens)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return [model(**tok(t, return_tensors="pt")).logits[0].tolist() for t in texts]


def run_load(server: Server, texts: list[str], clients: int, timeout_s: float) -> Result:
    path, bodies = bodies_for(server, texts)
    return asyncio.run(asyncio.wait_for(drive(server.url, path, bodies, len(texts), clients), timeout_s))


# -- measurement -----------------------------------------------------------------------------------
@dataclass
class Cell:
    """One workload's runs: per server, one Result (and counter deltas) per round."""

    results: dict[str, list[Result]] = field(default_factory=dict)
    counters: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def add(self, name: str, res: Result, counters: dict[str, float]) -> None:
        self.results.setdefault(name, []).append(res)
        self.counters.setdefault(name, []).append(counters)

    def med(self, name: str, attr: str = "items_per_s") -> float:
        return statistics.median(getattr(r, attr) for r in self.results[name])

    def ratios(self, a: str, b: str, attr: str = "items_per_s") -> list[float]:
        """Per-round a/b (rounds pair up: both ran on the same texts, back to back)."""
        return [
            getattr(x, attr) / getattr(y, attr) for x, y in zip(self.results[a], self.results[b], strict=True)
        ]


def measure(
    servers: list[Server],
    workloads: dict[str, tuple[list[str], int]],
    cells: dict[str, Cell],
    r: int,
    timeout_s: float,
) -> None:
    """One round: every workload on every server, the servers' order rotating with the round."""
    order = servers[r % len(servers) :] + servers[: r % len(servers)]
    for load, (texts, clients) in workloads.items():
        for s in order:
            wanted = VLLM_COUNTERS if s.name == VLLM else BATCH_COUNTERS
            before = scrape(s.url, wanted)
            res = run_load(s, texts, clients, timeout_s)
            after = scrape(s.url, wanted)
            cells.setdefault(load, Cell()).add(
                s.name, res, {k: v - before.get(k, 0.0) for k, v in after.items()}
            )
            print(
                f"round {r} {load:8s} {s.name:10s} {res.items_per_s:6.1f} items/s p50 {res.p50_ms:6.0f} ms "
                f"p99 {res.p99_ms:6.0f} ms errors {res.errors}",
                flush=True,
            )


def shape_of(counters: dict[str, float], res: Result, n: int) -> Shape | None:
    if "hydra_rm_batch_size_count" not in counters:
        return None
    return Shape(
        n / res.items_per_s,
        int(counters["hydra_rm_batch_size_count"]),
        max(1, int(counters["hydra_rm_batch_tokens_sum"])),
        int(counters["hydra_rm_tokens_total"]),
        counters["hydra_rm_inference_seconds_sum"],
    )


# -- report ----------------------------------------------------------------------------------------
def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


def report(
    args: argparse.Namespace, env: dict[str, Any], cells: dict[str, Cell], names: list[str]
) -> list[str]:
    has_vllm = VLLM in names
    lines = [
        "# hydra-rm vs vLLM, side by side (cpu)",
        "",
        f"Command: `{env['command']}`  ",
        "Defaults first: `hydra-rm` and `vLLM` at their defaults"
        + "".join(f"; `{n}` is hydra-rm with {env['desc'][n]}" for n in names if n in env["desc"])
        + ".  ",
        f"Model: Qwen2-style decoder, hidden {args.hidden}, {args.layers} layers, K=4 heads, fp32, random weights, "
        "max length 2,048. "
        f"torch {env['torch']} (hydra-rm), {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        "clients and servers share the machine.  ",
        f"**Load average** (`uptime`): {env['load_start']} at start, {env['load_end']} at end "
        "(the machine is shared; every comparison alternates servers within a round, on the same texts).",
        "",
        "Start-up (process start to ready): "
        + ", ".join(f"{n} {env['startup'][n]:.1f} s" for n in names)
        + ".  ",
        "Exactness (largest |head reward - HF logits| over "
        f"{env['agree_n']} items, one per request): "
        + ", ".join(f"{n} {env['agree'][n]:.1e}" for n in names)
        + ".",
        "",
        "| workload | clients | "
        + " | ".join(f"{n} items/s" for n in names)
        + (" | hydra-rm / vLLM (median of rounds) | per-round ratio spread" if has_vllm else "")
        + " |",
        "|---|---:|" + "---:|" * len(names) + ("---:|---|" if has_vllm else ""),
    ]
    for load, cell in cells.items():
        if load == "latency":
            continue
        row = f"| {load} | {args.clients} | " + " | ".join(f"{cell.med(n):.1f}" for n in names)
        if has_vllm:
            ratios = cell.ratios(HYDRA, VLLM)
            row += f" | **{statistics.median(ratios):.2f}x** | {spread(ratios)}"
        lines.append(row + " |")
    if "latency" in cells:
        lat = cells["latency"]
        lines += [
            "",
            f"Latency at c=1 ({env['latency_n']} distinct items, one at a time): "
            + ", ".join(
                f"{n} p50 {lat.med(n, 'p50_ms'):.0f} ms / p99 {lat.med(n, 'p99_ms'):.0f} ms" for n in names
            )
            + (
                f"; hydra-rm / vLLM p50 {statistics.median(lat.ratios(HYDRA, VLLM, 'p50_ms')):.2f}x "
                f"(spread {spread(lat.ratios(HYDRA, VLLM, 'p50_ms'))}; below 1 is faster)"
                if has_vllm
                else ""
            )
            + ".",
        ]
    for b in (n for n in names if n in env["desc"]):
        lines += ["", f"A/B `{b}` / `{HYDRA}` (median of per-round ratios, spread):", ""]
        for load, cell in cells.items():
            attr = "p50_ms" if load == "latency" else "items_per_s"
            ratios = cell.ratios(b, HYDRA, attr)
            lines.append(f"- {load} ({attr}): **{statistics.median(ratios):.3f}x** ({spread(ratios)})")
    lines += ["", "Rounds (items/s; latency: p50 ms):", ""]
    lines += ["| workload | round | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for load, cell in cells.items():
        attr = "p50_ms" if load == "latency" else "items_per_s"
        for r in range(len(cell.results[names[0]])):
            vals = " | ".join(f"{getattr(cell.results[n][r], attr):.1f}" for n in names)
            lines.append(f"| {load} | {r} | {vals} |")
    errors = sum(x.errors for c in cells.values() for rs in c.results.values() for x in rs)
    lines += ["", f"Errors (non-200 replies) over all runs: {errors}.", ""]
    lines += [
        "Where hydra-rm's time went (medians over rounds, from its /metrics: encoder batches, padding share, "
        "encoder-busy seconds; `encoder idle` = wall time the forward thread was not in a batch):",
        "",
        "| server | workload | batches | padding % | encoder s | wall s | encoder idle % | us / padded token |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for load, cell in cells.items():
        n = env["n_items"][load]
        for name in names:
            if name == VLLM:
                continue
            shapes = [shape_of(c, r, n) for c, r in zip(cell.counters[name], cell.results[name], strict=True)]
            picked = [s.describe() for s in shapes if s is not None]
            if not picked:
                continue
            m = {k: statistics.median(d[k] for d in picked) for k in picked[0]}
            lines.append(
                f"| {name} | {load} | {m['batches']:.0f} | {m['padding %']:.1f} | {m['encoder s']:.2f} | "
                f"{m['wall s']:.2f} | {m['encoder idle %']:.1f} | {m['us / padded token']:.1f} |"
            )
    if has_vllm:
        lines += ["", "vLLM's prefix cache (its /metrics, medians over rounds): "]
        parts = []
        for load, cell in cells.items():
            hits = [c.get("vllm:prefix_cache_hits_total", 0.0) for c in cell.counters[VLLM]]
            queries = [c.get("vllm:prefix_cache_queries_total", 0.0) for c in cell.counters[VLLM]]
            rates = [h / q for h, q in zip(hits, queries, strict=True) if q]
            if rates:
                parts.append(f"{load} {100 * statistics.median(rates):.0f}% of prompt tokens hit")
        lines.append("; ".join(parts) + "." if parts else "(no prefix-cache counters found).")
    if has_vllm and HYDRA_ON_VLLM in names:
        lines += ["", "Goal (issue 19): hydra-rm on its vLLM engine >= 0.95x raw vLLM on both workloads:", ""]
        for load in ("grpo", "distinct"):
            if load in cells:
                rs = cells[load].ratios(HYDRA_ON_VLLM, VLLM)
                med = statistics.median(rs)
                lines.append(f"- {load}: {med:.2f}x ({spread(rs)}), {'met' if med >= 0.95 else 'not met'}")
        if "latency" in cells:
            rs = cells["latency"].ratios(HYDRA_ON_VLLM, VLLM, "p50_ms")
            lines.append(f"- c=1 p50: {statistics.median(rs):.2f}x vLLM's ({spread(rs)}; below 1 is faster)")
    if has_vllm:
        lines += ["", "Goals (issue 18): >= 1.0x vLLM on both workloads at 32 clients; c=1 p50 no worse:", ""]
        for load in ("grpo", "distinct"):
            if load in cells:
                med = statistics.median(cells[load].ratios(HYDRA, VLLM))
                lines.append(f"- {load}: {med:.2f}x, {'met' if med >= 1.0 else 'not met'}")
        if "latency" in cells:
            med = statistics.median(cells["latency"].ratios(HYDRA, VLLM, "p50_ms"))
            lines.append(f"- c=1 p50: {med:.2f}x vLLM's, {'met' if med <= 1.0 else 'not met'}")
    return lines


def write(out: Path, lines: list[str]) -> None:
    """Rewrite the generated part, keep the hand-written notes below the marker."""
    notes = ""
    if out.exists():
        old = out.read_text()
        if NOTES in old:
            notes = old[old.index(NOTES) :]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n\n" + (notes or NOTES + "\n"))


def _uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=24, help="GRPO prompts (x --group responses)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--distinct", type=int, default=192)
    ap.add_argument("--latency-items", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--b-env", nargs="*", default=[], help="KEY=VALUE: a second hydra-rm server with these")
    ap.add_argument(
        "--b-root", type=Path, default=None, help="a second hydra-rm server from this source tree"
    )
    ap.add_argument("--c-env", nargs="*", default=[], help="a third hydra-rm server, as --b-env")
    ap.add_argument("--c-root", type=Path, default=None, help="a third hydra-rm server, as --b-root")
    ap.add_argument(
        "--no-vllm", action="store_true", help="hydra-rm only (the A/B of a change, or a smoke test)"
    )
    ap.add_argument(
        "--vllm-engine",
        action="store_true",
        help="add hydra-rm on its vLLM engine (HYDRA_RM_ENGINE=vllm) as a third column",
    )
    ap.add_argument("--timeout", type=float, default=600, help="seconds for one run of one workload")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # SIGTERM (a coordinator's timeout) unwinds like Ctrl-C, so `finally` stops every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch
    from transformers import AutoTokenizer

    from model_store.manifest import RewardManifest

    if not args.no_vllm and not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run `make vllm-env` (or `make bench-peer`) first")
    env: dict[str, Any] = {"torch": torch.__version__, "load_start": _uptime(), "command": " ".join(sys.argv)}
    tmp = Path(tempfile.mkdtemp(prefix="hydra-peer-vllm-"))
    model_dir = build_peer_model(tmp / "model", hidden=args.hidden, layers=args.layers)
    k = RewardManifest.read(model_dir).num_heads  # type: ignore[union-attr]
    tok = AutoTokenizer.from_pretrained(model_dir)

    servers = [hydra_server(HYDRA, model_dir, tmp, {})]
    env["desc"] = {}
    for name, kvs, root in (("hydra-rm B", args.b_env, args.b_root), ("hydra-rm C", args.c_env, args.c_root)):
        if kvs or root:
            env["desc"][name] = " ".join([*kvs, *([f"the code in {root}"] if root else [])])
            servers.append(
                hydra_server(name, model_dir, tmp, dict(kv.split("=", 1) for kv in kvs), root or ROOT)
            )
    if args.vllm_engine:
        env["desc"][HYDRA_ON_VLLM] = "HYDRA_RM_ENGINE=vllm (its own vLLM child)"
        servers.append(hydra_server(HYDRA_ON_VLLM, model_dir, tmp, {"HYDRA_RM_ENGINE": "vllm"}))
    if not args.no_vllm:
        servers.append(vllm_server(model_dir, tmp))
    names = [s.name for s in servers]
    cells: dict[str, Cell] = {}
    try:
        for s in servers:  # one at a time: vLLM's compile warm-up would slow the other's start-up
            print(f"starting {s.name} (log {s.log})", flush=True)
            s.start(args.start_timeout)
            print(f"{s.name} ready in {s.startup_s:.1f} s", flush=True)
        env["startup"] = {s.name: s.startup_s for s in servers}

        # Exactness first, on texts no measured round uses.
        check = grpo_texts(tok, seed=99, prompts=2, group=4, prompt_tokens=PROMPT_TOKENS)
        check += grpo_texts(tok, seed=98, prompts=4, group=1, shared=False, prompt_tokens=PROMPT_TOKENS)
        env["agree"] = agreement(servers, check, k, hf_reference(model_dir, tok, check))
        env["agree_n"] = len(check)
        print(f"agreement with HF: {env['agree']}", flush=True)
        warm = grpo_texts(tok, seed=97, prompts=2, group=8, prompt_tokens=PROMPT_TOKENS)
        for s in servers:
            run_load(s, warm, min(args.clients, 16), args.timeout)

        for r in range(args.rounds):
            seed = 1000 * (r + 1)  # fresh texts every round
            workloads = {
                "grpo": (
                    grpo_texts(
                        tok, seed=seed, prompts=args.prompts, group=args.group, prompt_tokens=PROMPT_TOKENS
                    ),
                    args.clients,
                ),
                "distinct": (
                    grpo_texts(tok, seed + 1, args.distinct, 1, shared=False, prompt_tokens=PROMPT_TOKENS),
                    args.clients,
                ),
                "latency": (
                    grpo_texts(
                        tok, seed + 2, args.latency_items, 1, shared=False, prompt_tokens=PROMPT_TOKENS
                    ),
                    1,
                ),
            }
            env["n_items"] = {w: len(t) for w, (t, _) in workloads.items()}
            env["latency_n"] = args.latency_items
            measure(servers, workloads, cells, r, args.timeout)
    finally:
        for s in servers:
            s.stop()
    env["load_end"] = _uptime()
    out = args.out or ROOT / "bench" / "results" / "peer-vllm-cpu.md"
    write(out, report(args, env, cells, names))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
