"""Several reward models in one server (HYDRA_RM_MODELS): each request gets its own model's rewards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scoring.engine import Item
from scoring.settings import Settings
from tests.builders import build_tiny_llama
from tests.service.conftest import live_server, metric_value


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return build_tiny_llama(root / "helpful", seed=0), build_tiny_llama(root / "safety", seed=7)


def _engine(path: Path, tmp: Path) -> Any:
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine

    return ScoringEngine(load_reward_model(str(path), ModelStore(tmp)))


def test_two_models_in_one_process_each_request_gets_its_own(two_models, tmp_path: Path) -> None:
    helpful_dir, safety_dir = two_models
    texts = ["Thank you, here is the answer.", "I cannot help with that request."]
    want = {
        name: [s.min for s in _engine(d, tmp_path / name).score([Item(text=t) for t in texts])]
        for name, d in (("helpful", helpful_dir), ("safety", safety_dir))
    }
    assert want["helpful"] != pytest.approx(want["safety"], abs=1e-3)  # the two models do differ
    settings = Settings(models=f"{helpful_dir},{safety_dir}", store_root=tmp_path / "store")
    with live_server(settings) as server, server.client() as c:
        cards = c.get("/v1/models").json()["data"]
        items = [{"text": t} for t in texts]
        default = c.post("/v1/score", json={"items": items}).json()
        chosen = {m: c.post("/v1/score", json={"items": items, "model": m}).json() for m in want}
        by_path = {m: c.post(f"/models/{m}/get_reward", json={"query": texts}).json() for m in want}
        plain = c.post("/get_reward", json={"query": texts}).json()
        unknown = c.post("/v1/score", json={"items": items, "model": "nope"})
        unknown_path = c.post("/models/nope/get_reward", json={"query": texts})
        ready = c.get("/readyz")
        text = c.get("/metrics").text
    assert [card["id"] for card in cards] == ["helpful", "safety"]
    assert default["model"] == "helpful" and [r["reward"] for r in default["results"]] == pytest.approx(
        want["helpful"], abs=1e-5
    )
    for m in want:
        assert chosen[m]["model"] == m
        assert [r["reward"] for r in chosen[m]["results"]] == pytest.approx(want[m], abs=1e-5)
        assert by_path[m]["rewards"] == pytest.approx(want[m], abs=1e-5)
    assert plain["rewards"] == pytest.approx(want["helpful"], abs=1e-5)
    assert unknown.status_code == 404 and unknown.json()["error"] == {
        "type": "model_not_found",
        "message": "model: no model named 'nope' is served here (served: helpful, safety)",
        "field": "model",
    }
    assert unknown_path.status_code == 404 and unknown_path.json()["error"]["field"] == "name"
    assert ready.status_code == 200 and ready.json()["model"] == "helpful:local,safety:local"
    # Each model's series carry its name; the request series stay app-wide (one per endpoint).
    assert metric_value(text, "hydra_rm_items_scored_total", {"model": "helpful"}) == 2 * 4
    assert metric_value(text, "hydra_rm_items_scored_total", {"model": "safety"}) == 2 * 2
    assert metric_value(text, "hydra_rm_ready", {"model": "safety"}) == 1
    assert metric_value(text, "hydra_rm_requests_total", {"endpoint": "/models/{name}/get_reward"}) == 3
    assert text.count("# TYPE hydra_rm_items_scored_total counter") == 1


def test_a_name_served_twice_fails_the_start(two_models, tmp_path: Path) -> None:
    helpful_dir, _ = two_models
    settings = Settings(models=f"{helpful_dir},{helpful_dir}", store_root=tmp_path / "store")
    with pytest.raises(RuntimeError, match="failed to start"), live_server(settings):
        pass


def test_settings_list_the_models_default_first() -> None:
    assert Settings(models=" a:v1, b ,").model_specs() == ["a:v1", "b"]
    assert Settings(model="x").model_specs() == ["x"]
    assert Settings().model_specs() == [None]
    assert Settings(models="a,b").for_model("b").model == "b"
