"""`std_percentile`: head disagreement against the quantiles training stored, in every output.

The trained model below is a real `hydra-rm train` run (tiny, from scratch): its quantiles were fitted
by the trainer on the reference split, so the engine's std must be on the same basis (normalised
heads, correction 0) for an item at the stored p95 to come out at 95.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from jobs.local import ScoreJob
from model_store import ModelStore
from model_store.loader import load_reward_model
from model_store.uncertainty import fit_quantiles, std_percentile
from scoring.batching import BatchPolicy
from scoring.engine import Item, ScoringEngine
from service.metrics import Metrics
from tests.service.conftest import live_server, metric_value
from training.data import parse_pair
from training.overopt import proxy_base, proxy_tokenizer
from training.toydata import preference_rows
from training.trainer import TrainConfig, Trainer, publish

ABOVE = "hydra_rm_items_above_reference_p95_total"
SCORED = "hydra_rm_items_scored_total"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScoringEngine, list[dict[str, Any]]]:
    """A 3-head model trained and published by the trainer, and its reference items (80)."""
    tmp = tmp_path_factory.mktemp("uncert")
    pairs = [parse_pair(r, f"row{i}") for i, r in enumerate(preference_rows(200, seed=7))]
    base = proxy_base(tmp / "base", proxy_tokenizer(), hidden=32, seed=1)
    store = ModelStore(tmp / "store")
    cfg = TrainConfig(heads=3, epochs=1, seed=0, lr_encoder=3e-3, lr_heads=3e-3, batch_size=32, progress=False, cpu=True)  # fmt: skip
    tr = Trainer(cfg, pairs[:160], str(base), store, reference=pairs[160:])
    publish(tr.run(), store, "toy", "v1")
    rm = load_reward_model("toy:v1", store)
    engine = ScoringEngine(rm, policy=BatchPolicy.resolve("cpu", token_budget=4096, max_batch_size=64))
    ref = [p.chosen for p in tr.ref_pairs] + [p.rejected for p in tr.ref_pairs]
    return engine, ref


def test_engine_std_is_on_the_basis_the_quantiles_were_fitted_on(trained) -> None:
    engine, ref = trained
    q = engine.manifest.disagreement
    assert q is not None and q.n == len(ref) == 80 and q.p95 is not None
    stds = [s.std for s in engine.score([Item(**it) for it in ref])]
    # Served (normalisation folded into the heads, population std) vs. what the trainer stored.
    refit = fit_quantiles(stds, q.probs)
    # Rounding grows by 1 / (a head's raw std): a head that barely varies after one epoch amplifies the
    # float differences of another batch shape or thread count (here a head's raw std is ~3e-5, and with
    # 2 torch threads the quantiles differed by 3.8e-5; one serial run of the whole suite failed at 1e-4).
    norm = engine.manifest.normalization
    tol = max(1e-4, 1e-7 / min(norm.std)) if norm is not None else 1e-4
    torch.testing.assert_close(torch.tensor(refit.values), torch.tensor(q.values), atol=tol, rtol=1e-4)
    # A sample std (correction 1) is sqrt(3/2) = 1.22x larger: this check tells the two apart.
    sample = fit_quantiles([s * 1.5**0.5 for s in stds], q.probs)
    assert not torch.allclose(torch.tensor(sample.values), torch.tensor(q.values), atol=1e-4, rtol=1e-4)
    assert std_percentile(q.p95, q) == pytest.approx(95.0)
    nearest = min(stds, key=lambda s: abs(s - q.p95))  # the reference item closest to the stored p95
    assert std_percentile(nearest, q) == pytest.approx(95.0, abs=100 / 79)  # one rank of 80 items
    above = sum(s > q.p95 for s in stds)
    assert 3 <= above <= 5  # ~5% of the reference (4 of 80 exactly, give or take float rounding)


def test_score_get_reward_models_and_metrics_with_quantiles(trained) -> None:
    engine, ref = trained
    q = engine.manifest.disagreement
    with live_server(engine=engine) as live, live.client() as c:
        m0 = httpx.get(f"{live.url}/metrics").text
        res = c.post("/v1/score", json={"items": ref}).json()["results"]
        for r in res:
            assert r["std_percentile"] == pytest.approx(std_percentile(r["std"], q), abs=1e-9)
        assert all(0.0 <= r["std_percentile"] <= 100.0 for r in res)
        assert max(r["std_percentile"] for r in res) == pytest.approx(100.0, abs=2.0)
        m1 = httpx.get(f"{live.url}/metrics").text
        above = sum(r["std"] > q.p95 for r in res)
        assert above > 0
        assert metric_value(m1, SCORED) - metric_value(m0, SCORED) == len(ref)
        assert metric_value(m1, ABOVE) - metric_value(m0, ABOVE) == above  # exactly, item by item

        texts = ["a short response", "The soup was wonderful and lovely.", "word " * 30]
        got = c.post("/get_reward", json={"query": texts}).json()
        logs = got["extra_logs"]
        assert len(logs["std_percentile"]) == 3
        for p, s in zip(logs["std_percentile"], logs["reward_std"], strict=True):
            assert p == pytest.approx(std_percentile(s, q), abs=1e-9)
        assert metric_value(httpx.get(f"{live.url}/metrics").text, SCORED) - metric_value(m1, SCORED) == 3

        card = c.get("/v1/models").json()["data"][0]
        assert card["disagreement"] == q.model_dump()


def test_without_quantiles_percentile_is_null_and_the_drift_series_absent(tiny_engine) -> None:
    assert tiny_engine.manifest.disagreement is None
    with live_server(engine=tiny_engine) as live, live.client() as c:
        res = c.post(
            "/v1/score", json={"items": [{"text": "hello"}, {"prompt": "p", "response": "r"}]}
        ).json()
        assert [r["std_percentile"] for r in res["results"]] == [None, None]
        assert all(r["std"] > 0 for r in res["results"])  # a std to place, but nothing to place it on
        logs = c.post("/get_reward", json={"query": ["hello"]}).json()["extra_logs"]
        assert "std_percentile" not in logs and "reward_std" in logs  # omitted, never null
        assert c.get("/v1/models").json()["data"][0]["disagreement"] is None
        text = httpx.get(f"{live.url}/metrics").text
        assert "hydra_rm_items_above_reference_p95" not in text  # no made-up 0% drift


def test_a_head_named_std_percentile_does_not_clobber_the_key(trained) -> None:
    engine, _ = trained
    names = ["std_percentile", "b", "c"]
    rm = replace(engine.rm, manifest=engine.manifest.model_copy(update={"head_names": names}))
    renamed = ScoringEngine(rm, policy=engine.policy)
    with live_server(engine=renamed) as live, live.client() as c:
        logs = c.post("/get_reward", json={"query": ["hello", "there"]}).json()["extra_logs"]
    assert len(logs["head_std_percentile"]) == 2 and all(0 <= p <= 100 for p in logs["std_percentile"])


def test_metric_counts_strictly_above_p95() -> None:
    from scoring.results import ItemScore

    m = Metrics(["a", "b"])
    m.set_reference_p95(0.5)

    def s(std: float) -> Any:
        return ItemScore([0.0, 0.0], 0.0, 0.0, 0.0, std, 3, False)

    enc = [type("E", (), {"n_tokens": 3})()] * 4
    m.observe_batch(enc, [s(0.1), s(0.5), s(0.51), s(2.0)], 0.01)
    text = m.render().decode()
    assert metric_value(text, ABOVE) == 2 and metric_value(text, SCORED) == 4


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_job_rows_carry_std_percentile(trained, tiny_engine, tmp_path: Path) -> None:
    engine, ref = trained
    q = engine.manifest.disagreement
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in ref[:20]))
    ScoreJob(engine, src, tmp_path / "out.jsonl").run(progress_bar=False)
    rows = _rows(tmp_path / "out.jsonl")
    assert len(rows) == 20
    for r in rows:
        assert r["std_percentile"] == pytest.approx(std_percentile(r["std"], q), abs=1e-9)
    ScoreJob(tiny_engine, src, tmp_path / "plain.jsonl").run(progress_bar=False)
    plain = _rows(tmp_path / "plain.jsonl")
    assert len(plain) == 20 and all("std_percentile" in r and r["std_percentile"] is None for r in plain)


def test_unpadded_engine_batches_report_no_padding() -> None:
    """A varlen engine (vLLM) computes real tokens only: padding 0, batch tokens = real tokens."""
    from scoring.results import ItemScore

    def s() -> Any:
        return ItemScore([0.0, 0.0], 0.0, 0.0, 0.0, 0.1, 3, False)

    enc = [type("E", (), {"n_tokens": n})() for n in (3, 9)]
    padded, varlen = Metrics(["a", "b"]), Metrics(["a", "b"])
    padded.observe_batch(enc, [s(), s()], 0.01)
    varlen.observe_batch(enc, [s(), s()], 0.01, padded_forward=False)

    def value(m: Metrics, name: str) -> float:
        return m.registry.get_sample_value(name) or 0.0

    assert (
        value(padded, "hydra_rm_batch_tokens_sum") == 18 and value(varlen, "hydra_rm_batch_tokens_sum") == 12
    )
    assert (
        value(padded, "hydra_rm_padding_ratio_sum") > 0.3 and value(varlen, "hydra_rm_padding_ratio_sum") == 0
    )


def test_stdp_takes_beta_reference_stds_per_median_disagreement(trained, tiny_engine) -> None:
    """`stdp` = mean - beta * reward_std * std / std_median, served per request, in reference units."""
    from model_store.aggregation import Aggregation

    engine, ref = trained
    q, nov = engine.manifest.disagreement, engine.manifest.novelty
    assert q is not None and q.median is not None and nov is not None
    scale = nov.reward_std / q.median
    items = ref[:12] + [{"text": "word " * 30}, {"text": "zx qv"}]
    with live_server(engine=engine) as live, live.client() as c:
        res = c.post("/v1/score", json={"items": items, "aggregation": "stdp", "stdp_beta": 0.5}).json()
        assert res["aggregation"] == "stdp" and res["stdp_beta"] == 0.5 and "lcb_beta" not in res
        for r in res["results"]:
            assert r["reward"] == pytest.approx(r["mean"] - 0.5 * scale * r["std"], abs=1e-6)
        assert any(r["reward"] < r["mean"] - 1e-4 for r in res["results"])  # it does take something off
        zero = c.post("/v1/score", json={"items": items, "aggregation": "stdp", "stdp_beta": 0.0}).json()
        assert [r["reward"] for r in zero["results"]] == [r["mean"] for r in zero["results"]]
        plain = c.post("/v1/score", json={"items": items}).json()
        assert "stdp_beta" not in plain  # only when it was used
    # apply_rows (training, eval, the experiment) is the same reduction as apply (serving).
    agg = Aggregation.parse("stdp", 3, stdp_beta=2.0).bind(nov, q)
    rewards = torch.tensor([[0.1, 0.3, -0.2], [1.0, 1.0, 1.0]])
    rows = agg.apply_rows(rewards)
    std = rewards.std(1, correction=0)
    torch.testing.assert_close(rows, rewards.mean(1) - 2.0 * scale * std)
    # A model without disagreement quantiles refuses it, naming the field.
    with live_server(engine=tiny_engine) as live, live.client() as c:
        bad = c.post("/v1/score", json={"items": [{"text": "hi"}], "aggregation": "stdp"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "aggregation"
    assert "disagreement" in bad.json()["error"]["message"]
