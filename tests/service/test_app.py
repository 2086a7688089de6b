"""End to end against a real uvicorn server: the API's shapes, its limits and its metrics."""

from __future__ import annotations

import json

import httpx
import pytest

from scoring.engine import Item
from scoring.settings import Settings
from service.protocol import ScoreItem
from tests.service.conftest import live_server, wait_until

PROMPT = "What is the capital of France?"


def test_health_ready_and_models(live):
    with live.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        card = c.get("/v1/models").json()["data"][0]
    engine = live.service.engine
    assert card["num_heads"] == engine.num_heads == len(card["head_names"])
    assert card["head_names"] == engine.head_names
    assert card["default_aggregation"] == "min"
    assert card["max_length"] == engine.max_length
    assert card["encoder"] == "llama"


def test_score_returns_every_head_and_the_requested_aggregation(live, tiny_engine):
    items = [
        {"prompt": PROMPT, "response": "Paris."},
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Lyon."}]},
        {"text": "a raw text to score"},
    ]
    expected = tiny_engine.score([ScoreItem.model_validate(i).to_item() for i in items])
    with live.client() as c:
        out = {}
        for agg in ["min", "mean", "max", "uwo", "head:2"]:
            r = c.post("/v1/score", json={"items": items, "aggregation": agg, "uwo_lambda": 0.5})
            assert r.status_code == 200, r.text
            out[agg] = r.json()
        default = c.post("/v1/score", json={"items": items, "return_heads": False}).json()
    body = out["min"]
    assert body["head_names"] == tiny_engine.head_names
    assert body["usage"] == {"items": 3, "tokens": sum(s.tokens for s in expected), "truncated": 0}
    for res, exp in zip(body["results"], expected, strict=True):
        assert list(res["heads"]) == tiny_engine.head_names  # by name, as the JSONL job writes them
        assert list(res["heads"].values()) == pytest.approx(exp.rewards, abs=1e-5)
        assert res["min"] == pytest.approx(min(res["heads"].values()), abs=1e-6)
        assert res["max"] == pytest.approx(max(res["heads"].values()), abs=1e-6)
        assert res["std"] == pytest.approx(exp.std, abs=1e-5)
    for i in range(3):
        heads = list(out["min"]["results"][i]["heads"].values())
        mean = sum(heads) / len(heads)
        var = sum((h - mean) ** 2 for h in heads) / len(heads)
        assert out["min"]["results"][i]["reward"] == pytest.approx(min(heads), abs=1e-6)
        assert out["max"]["results"][i]["reward"] == pytest.approx(max(heads), abs=1e-6)
        assert out["mean"]["results"][i]["reward"] == pytest.approx(mean, abs=1e-5)
        assert out["uwo"]["results"][i]["reward"] == pytest.approx(mean - 0.5 * var, abs=1e-5)
        assert out["head:2"]["results"][i]["reward"] == pytest.approx(heads[2], abs=1e-6)
    assert out["uwo"]["uwo_lambda"] == 0.5 and out["min"]["uwo_lambda"] is None
    assert default["aggregation"] == "min"
    assert all(r["heads"] is None for r in default["results"])
    assert [r["reward"] for r in default["results"]] == [r["reward"] for r in out["min"]["results"]]


def test_over_long_item_is_truncated_from_the_left_and_flagged(live):
    long_text = "word " * 2000
    with live.client() as c:
        res = c.post("/v1/score", json={"items": [{"text": long_text}]}).json()["results"][0]
    assert res["truncated"] is True
    assert res["tokens"] == live.service.engine.max_length


def test_get_reward_answers_openrlhf_exactly(live, tiny_engine):
    # Byte for byte what OpenRLHF's remote_rm_fn posts: one sample, label null.
    text = f"{PROMPT} The capital of France is Paris."
    payload = {"query": [text], "prompts": [PROMPT], "labels": [None]}
    with live.client() as c:
        r = c.post("/get_reward", content=json.dumps(payload), headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        body = r.json()
        many = c.post("/get_reward", json={"query": ["short", text, "a longer one " * 20]}).json()
        empty = c.post("/get_reward", json={"query": []})
        extra = c.post("/get_reward", json={"query": [text], "labels": ["4"], "future_key": {"x": 1}})
    expected = tiny_engine.score([Item(text=text)])[0]
    assert body["rewards"] == pytest.approx([expected.min], abs=1e-5)
    assert body["scores"] == body["rewards"]
    logs = body["extra_logs"]
    assert set(logs) == {"reward_std", "reward_min", "reward_mean", "reward_max", *tiny_engine.head_names}
    for key, values in logs.items():  # OpenRLHF logs each key per sample: a flat list of numbers
        assert isinstance(values, list) and len(values) == 1 and isinstance(values[0], float), key
    assert logs["reward_std"][0] == pytest.approx(expected.std, abs=1e-5)
    assert [logs[n][0] for n in tiny_engine.head_names] == pytest.approx(expected.rewards, abs=1e-5)
    assert many["rewards"][1] == pytest.approx(body["rewards"][0], abs=1e-5)  # input order kept
    assert len(many["rewards"]) == 3 and all(len(v) == 3 for v in many["extra_logs"].values())
    assert empty.status_code == 200 and empty.json()["rewards"] == []
    assert extra.status_code == 200


BAD_SCORE_BODIES = [
    ({}, "items"),
    ({"items": []}, "items"),
    ({"items": "text"}, "items"),
    ({"items": [{}]}, "items[0]"),
    ({"items": [{"text": "a", "prompt": "b", "response": "c"}]}, "items[0]"),
    ({"items": [{"prompt": "only a prompt"}]}, "items[0].response"),
    ({"items": [{"response": "only a response"}]}, "items[0].prompt"),
    ({"items": [{"text": 123}]}, "items[0].text"),
    ({"items": [{"text": "ok"}, {"text": ["not", "a", "string"]}]}, "items[1].text"),
    ({"items": [{"messages": []}]}, "items[0].messages"),
    ({"items": [{"messages": [{"role": "user"}]}]}, "items[0].messages[0].content"),
    ({"items": [{"messages": "hello"}]}, "items[0].messages"),
    ({"items": [{"text": "a", "colour": "red"}]}, "items[0].colour"),
    ({"items": [{"text": "a"}], "aggregation": "median"}, "aggregation"),
    ({"items": [{"text": "a"}], "aggregation": "head:9"}, "aggregation"),
    ({"items": [{"text": "a"}], "aggregation": "head:x"}, "aggregation"),
    ({"items": [{"text": "a"}], "uwo_lambda": -1}, "uwo_lambda"),
    ({"items": [{"text": "a"}], "return_heads": "maybe"}, "return_heads"),
    ({"items": [{"text": "a"}], "agregation": "min"}, "agregation"),
    ({"items": [{"text": "a"}] * 65}, "items"),
]


@pytest.mark.parametrize(("body", "field"), BAD_SCORE_BODIES)
def test_bad_score_input_gets_422_naming_the_field(live, body, field):
    with live.client() as c:
        r = c.post("/v1/score", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["field"] == field
    assert field.split("[")[0].split(".")[0] in error["message"]
    assert "Traceback" not in r.text


BAD_REWARD_BODIES = [
    ({}, "query"),
    ({"query": "one string"}, "query"),
    ({"query": [1, 2]}, "query[0]"),
    ({"query": [None]}, "query[0]"),
    ({"query": ["x"] * 65}, "query"),
]


@pytest.mark.parametrize(("body", "field"), BAD_REWARD_BODIES)
def test_bad_get_reward_input_gets_422(live, body, field):
    with live.client() as c:
        r = c.post("/get_reward", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_malformed_and_oversized_bodies(live):
    with live.client() as c:
        not_json = c.post("/v1/score", content=b"{items: nope", headers={"Content-Type": "application/json"})
        too_big = c.post("/v1/score", json={"items": [{"text": "x" * 70_000}]})
        chunked = c.post(  # no Content-Length: the limit is enforced while reading
            "/v1/score",
            content=iter([b'{"items": [{"text": "', b"y" * 70_000, b'"}]}']),
            headers={"Content-Type": "application/json"},
        )
        not_found = c.get("/v2/nothing")
        wrong_method = c.get("/v1/score")
    assert not_json.status_code == 422 and not_json.json()["error"]["field"] == "body"
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "payload_too_large"
    assert chunked.status_code == 413
    assert not_found.status_code == 404 and not_found.json()["error"]["type"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"


def test_reject_truncation_policy_gives_422_naming_the_item(tiny_llama_dir, tmp_path):
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine

    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path / "store"))
    engine = ScoringEngine(rm, max_length=32, truncation_side="reject")
    with live_server(Settings(), engine) as server, server.client() as c:
        ok = c.post("/v1/score", json={"items": [{"text": "short"}]})
        long = c.post("/v1/score", json={"items": [{"text": "short"}, {"text": "word " * 100}]})
    assert ok.status_code == 200
    assert long.status_code == 422
    assert long.json()["error"]["field"] == "items[1].text"
    assert "max_length=32" in long.json()["error"]["message"]


def test_metrics_expose_every_series_and_disagreement_moves(live):
    with live.client() as c:
        before = c.get("/metrics").text
        items = [{"text": f"sample number {i} " * (i + 1)} for i in range(6)]
        scored = c.post("/v1/score", json={"items": items}).json()["results"]
        c.post("/v1/score", json={"items": []})
        after = c.get("/metrics").text
    for series in [
        "hydra_rm_requests_total",
        "hydra_rm_request_duration_seconds_bucket",
        "hydra_rm_queue_items",
        "hydra_rm_queue_tokens",
        "hydra_rm_batch_size_bucket",
        "hydra_rm_batch_tokens_bucket",
        "hydra_rm_padding_ratio_bucket",
        "hydra_rm_tokens_per_second",
        "hydra_rm_tokens_total",
        "hydra_rm_inference_seconds_bucket",
        "hydra_rm_head_disagreement_bucket",
        "hydra_rm_head_reward_bucket",
        "hydra_rm_min_mean_gap_bucket",
        "hydra_rm_truncated_items_total",
        "hydra_rm_rejected_requests_total",
        "hydra_rm_ready",
    ]:
        assert f"\n{series}" in after, series
    from tests.service.conftest import metric_value as mv

    stds = [r["std"] for r in scored]
    assert all(s > 0 for s in stds)  # the tiny model's random heads do disagree
    count = mv(after, "hydra_rm_head_disagreement_count") - mv(before, "hydra_rm_head_disagreement_count")
    total = mv(after, "hydra_rm_head_disagreement_sum") - mv(before, "hydra_rm_head_disagreement_sum")
    assert count == 6
    assert total == pytest.approx(sum(stds), rel=1e-4)
    for name in live.service.head_names:
        assert f'hydra_rm_head_reward_count{{head="{name}"}}' in after
    rejected = {"reason": "invalid_request"}
    # Exactly this test's requests, whatever earlier tests left on the shared server.
    assert mv(after, "hydra_rm_rejected_requests_total", rejected) == 1 + mv(
        before, "hydra_rm_rejected_requests_total", rejected
    )
    ok = {"endpoint": "/v1/score", "status": "200"}
    assert mv(after, "hydra_rm_requests_total", ok) == 1 + mv(before, "hydra_rm_requests_total", ok)
    assert mv(after, "hydra_rm_ready") == 1


def test_metrics_are_hidden_from_openapi_and_errors_are_documented(live):
    with live.client() as c:
        spec = c.get("/openapi.json").json()
    assert "/metrics" not in spec["paths"]
    responses = spec["paths"]["/v1/score"]["post"]["responses"]
    assert {"200", "413", "422", "500", "503", "504"} <= set(responses)
    assert "securitySchemes" not in spec.get("components", {})  # auth off: nothing to declare


def test_readyz_reports_a_dead_batch_worker(tiny_engine) -> None:
    """Without its worker every request would time out: the probe must take the server out of rotation."""
    with live_server(Settings(), tiny_engine) as live:
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        service = live.service
        service._loop.call_soon_threadsafe(service.batcher._task.cancel)
        wait_until(lambda: not service.batcher.alive, what="worker cancelled")
        r = httpx.get(f"{live.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "broken"
        assert httpx.get(f"{live.url}/healthz").status_code == 200  # alive, just not ready


def test_request_larger_than_the_queue_names_its_own_field(tiny_engine) -> None:
    with live_server(Settings(max_queue_items=2), tiny_engine) as live:
        r = httpx.post(f"{live.url}/get_reward", json={"query": ["a", "b", "c"]})
        assert r.status_code == 413 and r.json()["error"]["field"] == "query"
        r = httpx.post(f"{live.url}/v1/score", json={"items": [{"text": t} for t in "abc"]})
        assert r.status_code == 413 and r.json()["error"]["field"] == "items"


def test_client_leaving_mid_upload_is_a_499_not_a_server_error(tiny_engine) -> None:
    import socket

    with live_server(Settings(), tiny_engine) as live:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"items": ['
            )
        wait_until(lambda: live.metric("hydra_rm_requests_total", {"status": "499"}) == 1, what="499 counted")
        assert live.metric("hydra_rm_requests_total", {"status": "500"}) == 0
        assert live.metric("hydra_rm_rejected_requests_total", {"reason": "client_disconnected"}) == 1
