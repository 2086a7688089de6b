"""Novelty u in the engine and every output: fitted by `calibrate` on models hydra-rm did not train.

u from the service must equal the formula applied to the model's own pooled state (from Hugging Face's
forward, not ours), and a model without the statistic must answer exactly as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from cli.import_check import check_importable
from jobs.local import ScoreJob
from model_store import ModelStore
from model_store.default_model import corpus_path
from model_store.loader import load_reward_model
from model_store.novelty import novelty
from model_store.uncertainty import std_percentile
from scoring.batching import BatchPolicy
from scoring.engine import Item, ScoringEngine
from scoring.settings import Settings
from tests.service.conftest import live_server, metric_value
from training.calibrate import calibrate

POLICY = BatchPolicy.resolve("cpu", token_budget=4096, max_batch_size=64)
TEXTS = [line for line in corpus_path().read_text().splitlines() if line.strip()][:120]
PROBES = ["The soup was wonderful and lovely.", "zx qv zx qv zx qv", "a", "good " * 40]


def _write_texts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each HF test model, plain and calibrated (published as a new store version, import-checked)."""
    tmp = tmp_path_factory.mktemp("novelty")
    store = ModelStore(tmp / "store")
    data = _write_texts(tmp / "texts.jsonl")
    settings = Settings(store_root=store.root)
    out = {}
    for kind, src in (("llama", tiny_llama_dir), ("bert", tiny_bert_dir)):
        plain = store.publish(src, kind)
        ref, info = calibrate(kind, data, store, lam=0.5, check=lambda c: check_importable(c, settings))
        assert (plain.version, ref.version) == ("v1", "v2")  # a new version; v1 is untouched
        out[kind] = {
            "plain": ScoringEngine(load_reward_model(f"{kind}:v1", store), policy=POLICY),
            "nov": ScoringEngine(load_reward_model(f"{kind}:v2", store), policy=POLICY),
            "info": info,
        }
    return out


def _hf_features(engine: ScoringEngine, text: str) -> torch.Tensor:
    """The pooled row from the model's own HF modules, one unpadded item."""
    model, tok = engine.model, engine.tokenizer
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        if hasattr(model, "score"):  # decoder: the last token of the final (normed) hidden state
            return model.model(**enc).last_hidden_state[0, -1].double()
        return model.bert(**enc).pooler_output[0].double()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_engine_u_is_the_formula_on_the_models_own_features(calibrated: dict, kind: str) -> None:
    nov, plain, info = calibrated[kind]["nov"], calibrated[kind]["plain"], calibrated[kind]["info"]
    assert nov.novelty is not None and plain.novelty is None
    assert info.feature == nov.head.kind and info.quantiles.n == round(len(TEXTS) * 0.2)
    assert info.n == len(TEXTS) - info.quantiles.n
    stat = nov.rm.novelty
    got = nov.score([Item(text=t) for t in PROBES])
    want = novelty(torch.stack([_hf_features(nov, t) for t in PROBES]), stat)
    torch.testing.assert_close(
        torch.tensor([s.novelty for s in got], dtype=torch.float64), want, rtol=1e-4, atol=1e-5
    )
    # the statistic changes nothing else: every other field equal, bit for bit
    base = plain.score([Item(text=t) for t in PROBES])
    for a, b in zip(base, got, strict=True):
        assert a.novelty is None and a.summary() == {k: v for k, v in b.summary().items() if k != "novelty"}
        assert a.rewards == b.rewards
    # texts like the reference are less novel than gibberish
    ref_u = [s.novelty for s in nov.score([Item(text=t) for t in TEXTS[:30]])]
    odd_u = nov.score([Item(text="qv zx " * 30)])[0].novelty
    assert odd_u > sorted(ref_u)[len(ref_u) // 2]


def test_batch_and_prefix_paths_agree(calibrated: dict) -> None:
    eng = calibrated["llama"]["nov"]
    items = [Item(prompt="Tell me about the soup.", response=r) for r in ("It was good.", "Cold.", "x " * 30)]
    alone = [eng.score([it])[0].novelty for it in items]
    together = [s.novelty for s in eng.score(items)]  # padded with neighbours, shared prompt
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-5, atol=1e-6)


def test_http_outputs_with_novelty(calibrated: dict) -> None:
    eng, info = calibrated["llama"]["nov"], calibrated["llama"]["info"]
    q = info.quantiles
    items = [{"text": t} for t in PROBES]
    with live_server(engine=eng) as live, live.client() as c:
        m0 = httpx.get(f"{live.url}/metrics").text
        res = c.post("/v1/score", json={"items": items}).json()
        for r in res["results"]:
            assert r["novelty"] > 0 and r["novelty_percentile"] == pytest.approx(
                std_percentile(r["novelty"], q)
            )
        lcb = c.post("/v1/score", json={"items": items, "aggregation": "lcb", "lcb_beta": 0.5}).json()
        assert lcb["aggregation"] == "lcb" and lcb["lcb_beta"] == 0.5
        for r in lcb["results"]:
            want = r["mean"] - 0.5 * info.reward_std / info.median * r["novelty"]
            assert r["reward"] == pytest.approx(want, rel=1e-6, abs=1e-6)
        zero = c.post("/v1/score", json={"items": items, "aggregation": "lcb", "lcb_beta": 0.0}).json()
        assert [r["reward"] for r in zero["results"]] == pytest.approx([r["mean"] for r in res["results"]])
        logs = c.post("/get_reward", json={"query": PROBES}).json()["extra_logs"]
        assert logs["novelty"] == pytest.approx([r["novelty"] for r in res["results"]], rel=1e-6)
        assert len(logs["novelty_percentile"]) == len(PROBES)
        assert c.get("/v1/models").json()["data"][0]["novelty"]["lam"] == 0.5
        m1 = httpx.get(f"{live.url}/metrics").text
        n = 4 * len(PROBES)  # score, lcb, lcb at beta 0, get_reward
        assert metric_value(m1, "hydra_rm_novelty_count") - metric_value(m0, "hydra_rm_novelty_count") == n
        above = sum(r["novelty"] > q.p95 for r in res["results"])
        assert metric_value(m1, "hydra_rm_items_above_novelty_p95_total") == 4 * above


def test_without_the_statistic_nothing_changes(calibrated: dict, tmp_path: Path) -> None:
    eng = calibrated["llama"]["plain"]
    items = [{"text": t} for t in PROBES]
    with live_server(engine=eng) as live, live.client() as c:
        res = c.post("/v1/score", json={"items": items}).json()
        assert set(res) == {"model", "version", "aggregation", "uwo_lambda", "head_names", "results", "usage"}
        assert set(res["results"][0]) == {"reward", "heads", "min", "max", "mean", "std", "tokens", "truncated", "std_percentile"}  # fmt: skip
        bad = c.post("/v1/score", json={"items": items, "aggregation": "lcb"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "aggregation"
        assert "novelty" not in c.post("/get_reward", json={"query": PROBES}).json()["extra_logs"]
        assert "novelty" not in c.get("/v1/models").json()["data"][0]
        assert "hydra_rm_novelty" not in httpx.get(f"{live.url}/metrics").text


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_job_rows(calibrated: dict, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROBES))
    nov = calibrated["bert"]["nov"]
    ScoreJob(nov, src, tmp_path / "out.jsonl").run(progress_bar=False)
    rows = _rows(tmp_path / "out.jsonl")
    want = [s.novelty for s in nov.score([Item(text=t) for t in PROBES])]
    assert [r["novelty"] for r in rows] == pytest.approx(want, rel=1e-6)
    assert all(0 <= r["novelty_percentile"] <= 100 for r in rows)
    ScoreJob(calibrated["bert"]["plain"], src, tmp_path / "plain.jsonl").run(progress_bar=False)
    assert all("novelty" not in r and "novelty_percentile" not in r for r in _rows(tmp_path / "plain.jsonl"))


class _NoU(ScoringEngine):
    """A torch engine that does not compute u, standing in for one that cannot (the vLLM engine)."""

    novelty_unavailable = "this engine pools no hidden state"

    def _novelty_tensors(self) -> None:
        return None


def test_an_engine_that_cannot_compute_u_says_so_and_refuses_lcb(calibrated: dict) -> None:
    from scoring.interface import novelty_unavailable, served_novelty

    nov = calibrated["llama"]["nov"]
    blind = _NoU(nov.rm, policy=POLICY)
    assert blind.manifest.novelty is not None and served_novelty(blind) is None
    assert novelty_unavailable(blind) == _NoU.novelty_unavailable and novelty_unavailable(nov) is None
    items = [{"text": t} for t in PROBES]
    with live_server(engine=blind) as live, live.client() as c:
        res = c.post("/v1/score", json={"items": items}).json()
        assert all("novelty" not in r for r in res["results"])
        # the rewards are the torch engine's with the statistic, field for field
        want = [s.summary() for s in nov.score([Item(text=t) for t in PROBES])]
        for r, w in zip(res["results"], want, strict=True):
            assert r["reward"] == pytest.approx(w["min"]) and r["std"] == pytest.approx(w["std"])
        bad = c.post("/v1/score", json={"items": items, "aggregation": "lcb"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "aggregation"
        assert "not served: this engine pools no hidden state" in bad.json()["error"]["message"]
        card = c.get("/v1/models").json()["data"][0]
        assert "novelty" not in card and card["novelty_unavailable"] == _NoU.novelty_unavailable
        assert "hydra_rm_novelty" not in httpx.get(f"{live.url}/metrics").text
    # as the default aggregation it is refused at start-up, not on every item
    with pytest.raises(ValueError, match="aggregation setting: `lcb` needs the model's novelty statistic"):
        Settings(aggregation="lcb").resolved_aggregation(blind)
    assert Settings(aggregation="lcb").resolved_aggregation(nov).kind == "lcb"
