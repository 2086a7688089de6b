"""The vLLM engine (HYDRA_RM_ENGINE=vllm) against HF and against the torch engine, on vLLM's CPU build.

Skipped, with the reason printed, when vLLM's venv (`.venv-vllm`, `make vllm-env`) is absent; `make
test-vllm` builds it and runs these. One vLLM child serves the whole module (it takes 30-90 s to start
on this CPU); the behaviour tests run the same code against both engines.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from model_store.manifest import HeadNormalization, RewardManifest
from scoring.engine import Item
from scoring.settings import Settings
from scoring.vllm_engine import VllmUnavailable, vllm_available
from tests.builders import build_tiny_decoder
from tests.service.conftest import ControlledEngine, live_server, wait_until

needs_vllm = pytest.mark.skipif(
    not vllm_available(),
    reason="vLLM's venv is absent (.venv-vllm): `make test-vllm` builds it (3.5 GB) and runs these tests",
)

PROMPT = "Explain why the sky is blue to a child, in two sentences."
RESPONSES = [
    "Sunlight bounces off the air, and blue light bounces the most.",
    "Because it is painted blue.",
    "The air scatters short blue waves of sunlight more than red ones, so blue comes from every side.",
    "I do not know.",
]
NORM = HeadNormalization(mean=[0.1, -0.2, 0.3, 0.0], std=[0.5, 2.0, 1.5, 1.0])


def build_model(dest: Path) -> Path:
    """Qwen2-style K=4 (RoPE, GQA, biased q/k/v; head_dim 64 as vLLM's CPU attention wants) with a
    per-head normalisation in its manifest, so the fold is exercised."""
    build_tiny_decoder(dest, "qwen2", hidden=256, layers=2, k=4, max_positions=1024)
    manifest = RewardManifest.read(dest)
    assert manifest is not None
    manifest.normalization = NORM
    manifest.max_length = 512
    manifest.write(dest)
    return dest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("qwen2-k4"))


@pytest.fixture(scope="module")
def torch_engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine

    return ScoringEngine(load_reward_model(str(model_dir), ModelStore(tmp_path_factory.mktemp("store"))))


@pytest.fixture(scope="module")
def vllm_engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not vllm_available():
        pytest.skip("vLLM's venv is absent (.venv-vllm): `make test-vllm` builds it and runs these tests")
    from scoring.vllm_engine import build_vllm_engine

    # No VLLM_CPU_KVCACHE_SPACE here: the engine's own default must start vLLM on a host whose RAM is
    # not 92% free (vLLM 0.32's CPU default), as a user's is.
    settings = Settings(engine="vllm", model=str(model_dir), store_root=tmp_path_factory.mktemp("store"))
    engine = build_vllm_engine(settings)
    yield engine
    engine.close()


@pytest.fixture(params=["torch", "vllm"])
def engine(request: pytest.FixtureRequest) -> Any:
    if request.param == "vllm" and not vllm_available():
        pytest.skip("vLLM's venv is absent (.venv-vllm): `make test-vllm` builds it and runs these tests")
    return request.getfixturevalue(f"{request.param}_engine")


def hf_rewards(model_dir: Path, ids: list[list[int]]) -> torch.Tensor:
    """HF's own logits for each item alone (no padding), normalised as the manifest says."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = torch.cat([model(input_ids=torch.tensor([x])).logits for x in ids]).float()
    return (logits - torch.tensor(NORM.mean)) / torch.tensor(NORM.std)


# -- refused before anything starts (no vLLM needed) ---------------------------------------------------
def test_vllm_refuses_an_encoder_model_with_a_clear_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from scoring.vllm_engine import build_vllm_engine

    settings = Settings(engine="vllm", model=str(tiny_bert_dir), store_root=tmp_path, vllm_python=Path("/"))
    with pytest.raises(VllmUnavailable, match="decoder reward models only.*BertForSequenceClassification"):
        build_vllm_engine(settings)


def test_the_child_sizes_its_kv_cache_unless_the_operator_did() -> None:
    from scoring.vllm_engine import child_env

    assert child_env({})["VLLM_CPU_KVCACHE_SPACE"] == "2"  # not 92% of the host's RAM
    assert child_env({"VLLM_CPU_KVCACHE_SPACE": "8"})["VLLM_CPU_KVCACHE_SPACE"] == "8"
    assert child_env({"HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "1"


def test_vllm_without_its_venv_says_how_to_get_it(model_dir: Path, tmp_path: Path) -> None:
    from scoring.vllm_engine import build_vllm_engine

    settings = Settings(
        engine="vllm", model=str(model_dir), store_root=tmp_path, vllm_python=tmp_path / "nope"
    )
    with pytest.raises(VllmUnavailable, match="make vllm-env"):
        build_vllm_engine(settings)


# -- parity ----------------------------------------------------------------------------------------
@needs_vllm
def test_rewards_through_both_routes_equal_hf_logits(vllm_engine: Any, model_dir: Path) -> None:
    texts = [f"{PROMPT}\n{r}" for r in RESPONSES] + ["short", "word " * 300]
    ids = [vllm_engine.encode(Item(text=t)).input_ids for t in texts]
    ref = hf_rewards(model_dir, ids)
    with live_server(Settings(), vllm_engine) as server, server.client() as c:
        score = c.post("/v1/score", json={"items": [{"text": t} for t in texts]})
        reward = c.post("/get_reward", json={"query": texts})
        card = c.get("/v1/models").json()["data"][0]
    assert score.status_code == 200 and reward.status_code == 200, (score.text, reward.text)
    heads = torch.tensor([[r["heads"][n] for n in vllm_engine.head_names] for r in score.json()["results"]])
    assert (heads - ref).abs().max().item() < 1e-4
    logs = reward.json()["extra_logs"]
    per_head = torch.tensor([logs[n] for n in vllm_engine.head_names]).T
    assert (per_head - ref).abs().max().item() < 1e-4
    assert reward.json()["rewards"] == pytest.approx(ref.min(dim=1).values.tolist(), abs=1e-4)
    assert card["num_heads"] == 4 and card["encoder"] == "qwen2" and card["pooling"] == "last_token"


@needs_vllm
def test_every_aggregation_equals_the_torch_engines(vllm_engine: Any, torch_engine: Any) -> None:
    items = [{"prompt": PROMPT, "response": r} for r in RESPONSES] + [
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSES[0]}]}
    ]
    answers: dict[str, dict[str, Any]] = {}
    for kind, eng in (("torch", torch_engine), ("vllm", vllm_engine)):
        with live_server(Settings(), eng) as server, server.client() as c:
            for agg in ["min", "mean", "max", "uwo", "head:2"]:
                r = c.post("/v1/score", json={"items": items, "aggregation": agg, "uwo_lambda": 0.7})
                assert r.status_code == 200, r.text
                answers[f"{kind}/{agg}"] = r.json()
    for agg in ["min", "mean", "max", "uwo", "head:2"]:
        t, v = answers[f"torch/{agg}"], answers[f"vllm/{agg}"]
        assert v["aggregation"] == t["aggregation"] and v["head_names"] == t["head_names"]
        assert v["usage"] == t["usage"]
        for a, b in zip(t["results"], v["results"], strict=True):
            for key in ("reward", "min", "max", "mean", "std"):
                assert b[key] == pytest.approx(a[key], abs=1e-4), (agg, key)
            assert b["tokens"] == a["tokens"] and b["truncated"] == a["truncated"]


def _vllm_metric(engine: Any, name: str) -> float:
    text = httpx.get(f"{engine.child.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@needs_vllm
def test_a_grpo_workload_is_served_with_prefix_caching(vllm_engine: Any, torch_engine: Any) -> None:
    """8 prompts x 8 responses, one sample per /get_reward request as OpenRLHF sends them."""
    prompts = [f"Question {p}: " + " ".join(f"fact{p}-{w}" for w in range(60)) for p in range(8)]
    texts = [f"{p}\nAnswer {g}: " + "word " * (5 + 7 * g) for p in prompts for g in range(8)]
    hits_before = _vllm_metric(vllm_engine, "vllm:prefix_cache_hits_total")

    async def burst(url: str) -> list[float]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/get_reward", json={"query": [t]}) for t in texts))
        assert all(r.status_code == 200 for r in rs)
        return [r.json()["rewards"][0] for r in rs]

    with live_server(Settings(), vllm_engine) as server:
        got = asyncio.run(burst(server.url))
    expected = [s.min for s in torch_engine.score([Item(text=t) for t in texts])]
    assert got == pytest.approx(expected, abs=1e-4)
    # The groups' prompts were computed once and reused: vLLM counts the cached tokens it served.
    assert _vllm_metric(vllm_engine, "vllm:prefix_cache_hits_total") - hits_before > 7 * 8 * 16


# -- behaviour, the same tests against both engines ---------------------------------------------------
def test_overload_is_503_with_retry_after(engine: Any) -> None:
    gated = ControlledEngine(engine)
    settings = Settings(max_queue_items=4, retry_after_s=3)
    with live_server(settings, gated) as server, server.client() as c:
        gated.gate.clear()
        first: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: first.setdefault("r", c.post("/v1/score", json={"items": [{"text": "a"}] * 4}))
        )
        t.start()
        wait_until(gated.entered.is_set, what="the first batch to reach the engine")
        wait_until(lambda: server.service.batcher.queued_items == 4, what="the queue to hold 4 items")
        over = httpx.post(f"{server.url}/v1/score", json={"items": [{"text": "b"}]}, timeout=30)
        gated.gate.set()
        t.join(60)
    assert over.status_code == 503 and over.headers["retry-after"] == "3"
    assert over.json()["error"]["type"] == "overloaded"
    assert first["r"].status_code == 200 and len(first["r"].json()["results"]) == 4


def test_a_deadline_is_504_and_drops_the_queued_items(engine: Any) -> None:
    gated = ControlledEngine(engine)
    with live_server(Settings(request_timeout_s=0.5), gated) as server:
        gated.gate.clear()
        r = httpx.post(f"{server.url}/v1/score", json={"items": [{"text": "late"}]}, timeout=30)
        gated.gate.set()
        wait_until(lambda: server.service.batcher.queued_items == 0, what="the dropped items to be released")
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def _rejecting(engine: Any, max_length: int = 64) -> Any:
    """The engine with `truncation_side=reject` at `max_length`: the same ItemTokenizer both engines use."""
    from model_store.tokenization import ItemTokenizer

    twin = copy.copy(engine)
    twin.items = ItemTokenizer(
        engine.tokenizer, engine.manifest, max_length=max_length, truncation_side="reject"
    )
    return twin


def test_a_bad_item_is_refused_exactly_as_with_torch(engine: Any, torch_engine: Any) -> None:
    bodies = [
        {"items": [{"prompt": "p"}]},
        {"items": [{"text": "ok"}, {"text": "ok", "prompt": "p", "response": "r"}]},
        {"items": [{"text": "ok"}, {"messages": []}]},
        {"items": [{"text": "ok"}], "aggregation": "head:9"},
        {"items": [{"text": "ok"}], "model": "not-served"},
        {"items": [{"text": "ok"}, {"text": "word " * 200}]},  # over max_length under `reject`
    ]
    answers = []
    for eng in (_rejecting(engine), _rejecting(torch_engine)):
        with live_server(Settings(), eng) as server, server.client() as c:
            answers.append(
                [c.post("/v1/score", json=b) for b in bodies] + [c.post("/get_reward", json={"query": [1]})]
            )
    for g, w in zip(*answers, strict=True):
        assert g.status_code == w.status_code and g.status_code in (404, 422), g.text
        assert g.json() == w.json()
    assert answers[0][-2].json()["error"]["field"] == "items[1].text"
    assert answers[0][-1].json()["error"]["field"] == "query[0]"


def test_metrics_count_the_items_and_the_disagreement(engine: Any) -> None:
    from tests.service.conftest import metric_value

    with live_server(Settings(), engine) as server, server.client() as c:
        r = c.post("/v1/score", json={"items": [{"text": f"item {i} " * (i + 1)} for i in range(5)]})
        text = c.get("/metrics").text
    assert r.status_code == 200
    assert metric_value(text, "hydra_rm_items_scored_total") >= 5
    assert metric_value(text, "hydra_rm_head_disagreement_count") >= 5
    assert metric_value(text, "hydra_rm_requests_total", {"endpoint": "/v1/score", "status": "200"}) == 1


# -- a real `hydra-rm serve` process on the vLLM engine ---------------------------------------------
@needs_vllm
def test_sigterm_drains_then_stops_the_vllm_server(
    model_dir: Path, torch_engine: Any, tmp_path: Path
) -> None:
    import psutil

    from tests.service.conftest import metric_value
    from tests.service.test_server import start_server

    env = {"HYDRA_RM_ENGINE": "vllm", "HYDRA_RM_MAX_BATCH_SIZE": "2"}
    # vLLM's start: 30-45 s on a quiet 2-core CPU, minutes on a busy one.
    proc, url = start_server(tmp_path, "--model", str(model_dir), ready_timeout_s=1200, **env)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("vllm_child.py" in " ".join(c.cmdline()) for c in children)
        texts = [f"request {i}: " + "lorem ipsum dolor sit amet " * (10 + i) for i in range(24)]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=300) as c:
                tasks = [asyncio.ensure_future(c.post("/get_reward", json={"query": [t]})) for t in texts]
                while True:  # every request received (in flight or answered) before the SIGTERM
                    text = (await c.get("/metrics")).text
                    seen = metric_value(text, "hydra_rm_requests_in_flight", {"endpoint": "/get_reward"})
                    seen += metric_value(text, "hydra_rm_requests_total", {"endpoint": "/get_reward"})
                    if seen >= len(texts):
                        break
                    await asyncio.sleep(0.05)
                os.kill(proc.pid, signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(burst())
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = [s.min for s in torch_engine.score([Item(text=t) for t in texts])]
    assert [r.status_code for r in responses] == [200] * len(texts)
    assert [r.json()["rewards"][0] for r in responses] == pytest.approx(expected, abs=1e-4)
    gone = psutil.wait_procs(children, timeout=30)[1]
    assert not gone, f"vLLM processes left running after the server exited: {[p.pid for p in gone]}"


def test_the_launcher_takes_the_server_down_when_hydra_rm_is_killed(tmp_path: Path) -> None:
    """SIGKILL of hydra-rm (no atexit, no lifespan): the launcher ends the server's process group.
    A stand-in `vllm.entrypoints.openai.api_server` that only sleeps plays the server, so this runs
    without vLLM."""
    import subprocess
    import sys
    import time

    import psutil

    from scoring.vllm_engine import LAUNCHER

    pkg = tmp_path / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text("import time\ntime.sleep(600)\n")
    parent_code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, {str(LAUNCHER)!r}, '--model', 'x'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE)
    launcher = psutil.Process(int(parent.stdout.readline()))

    def serving() -> bool:  # a child exists and has exec'd the server (right after fork it is a copy)
        try:
            return any("api_server" in " ".join(c.cmdline()) for c in launcher.children(recursive=True))
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 60
    while not serving() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert serving()
    group = [launcher, *launcher.children(recursive=True)]
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs(group, timeout=30)
    assert not alive, f"left running after hydra-rm was killed: {[p.pid for p in alive]}"


@needs_vllm
def test_a_model_with_novelty_is_served_without_u_and_says_why(
    vllm_engine: Any, model_dir: Path, tmp_path: Path
) -> None:
    """vLLM returns logits, not the pooled state u is computed on: the loss is stated, never silent."""
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine
    from training.calibrate import calibrate

    store = ModelStore(tmp_path / "store")
    data = tmp_path / "texts.jsonl"
    texts = [f"{PROMPT}\n{r} {i}" for i in range(12) for r in RESPONSES]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ref, _ = calibrate(str(model_dir), data, store, name="qwen2-nov", lam=0.5)
    torch_nov = ScoringEngine(load_reward_model(f"qwen2-nov:{ref.version}", store))
    assert torch_nov.novelty is not None
    twin = copy.copy(vllm_engine)  # the same weights, now with the calibrated manifest
    twin.manifest = torch_nov.manifest
    items = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    with live_server(Settings(), twin) as server, server.client() as c:
        got = c.post("/v1/score", json={"items": items}).json()["results"]
        bad = c.post("/v1/score", json={"items": items, "aggregation": "lcb"})
        card = c.get("/v1/models").json()["data"][0]
    want = torch_nov.score([Item(prompt=PROMPT, response=r) for r in RESPONSES])
    assert [r["reward"] for r in got] == pytest.approx([s.min for s in want], abs=1e-4)
    assert all(s.novelty is not None for s in want) and all("novelty" not in r for r in got)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "aggregation"
    assert "HYDRA_RM_ENGINE=torch" in bad.json()["error"]["message"]
    assert "HYDRA_RM_ENGINE=torch" in card["novelty_unavailable"]
    with pytest.raises(ValueError, match="`lcb` needs the model's novelty statistic, which is not served"):
        Settings(aggregation="lcb").resolved_aggregation(twin)


def test_the_childs_api_key_can_never_be_read_as_an_option() -> None:
    import re

    from scoring.vllm_engine import api_key

    keys = {api_key() for _ in range(2000)}
    assert len(keys) == 2000 and all(re.fullmatch(r"[0-9a-f]{48}", k) for k in keys)
