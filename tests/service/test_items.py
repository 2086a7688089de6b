"""One validator for items: a bad item gets the same field and message over HTTP and as a JSONL line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.local import ScoreJob

# (item, the field a JSONL line names; over HTTP the same item in `items[0]` names items[0].<field>)
BAD_ITEMS = [
    ({}, "item"),
    ({"text": "a", "prompt": "b", "response": "c"}, "item"),
    ({"text": "a", "messages": [{"role": "user", "content": "hi"}]}, "item"),
    ({"prompt": "only a prompt"}, "response"),
    ({"response": "only a response"}, "prompt"),
    ({"prompt": "p", "response": None}, "response"),
    ({"prompt": 1, "response": "r"}, "prompt"),
    ({"text": 3}, "text"),
    ({"text": ["not", "a", "string"]}, "text"),
    ({"text": "lone surrogate \ud800 here"}, "text"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"text": "a", "colour": "red"}, "colour"),
]


def _http_field(jsonl_field: str) -> str:
    return "items[0]" if jsonl_field == "item" else f"items[0].{jsonl_field}"


@pytest.fixture(scope="module")
def jsonl_errors(tiny_engine, tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("items")
    src, out = tmp / "in.jsonl", tmp / "out.jsonl"
    src.write_text("".join(json.dumps({"id": i, **item}) + "\n" for i, (item, _) in enumerate(BAD_ITEMS)))
    result = ScoreJob(tiny_engine, src, out).run(progress_bar=False)
    assert (result.scored, result.errors) == (0, len(BAD_ITEMS))
    errors = [json.loads(x) for x in (tmp / "out.errors.jsonl").read_text().splitlines()]
    return {e["line"] - 1: e for e in errors}


@pytest.mark.parametrize(("index", "field"), [(i, f) for i, (_, f) in enumerate(BAD_ITEMS)])
def test_bad_item_same_field_and_message_over_http_and_jsonl(live, jsonl_errors, index, field) -> None:
    item = BAD_ITEMS[index][0]
    with live.client() as c:
        body = json.dumps({"items": [item]})  # ASCII-escaped, so a lone surrogate travels as JSON does
        r = c.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    http = r.json()["error"]
    line = jsonl_errors[index]
    assert line["field"] == field
    assert http["field"] == _http_field(field)
    assert line["error"].startswith(f"{field}: ")
    assert http["message"] == _http_field(field) + line["error"][len(field) :]


def test_over_long_item_under_reject_names_the_same_field(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Errors the engine finds (not the validator) also agree: the reject truncation policy."""
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine
    from scoring.settings import Settings
    from tests.service.conftest import live_server

    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path / "store"))
    engine = ScoringEngine(rm, max_length=16, truncation_side="reject")
    item = {"prompt": "q", "response": "word " * 40}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(item) + "\n")
    ScoreJob(engine, src, out).run(progress_bar=False)
    [line] = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    with live_server(Settings(), engine) as server, server.client() as c:
        http = c.post("/v1/score", json={"items": [item]}).json()["error"]
    assert line["field"] == "response" and http["field"] == "items[0].response"
    assert "max_length=16" in line["error"]
    assert http["message"] == "items[0].response: " + line["error"]
