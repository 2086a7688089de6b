"""The client's copy of the response shape stays the server's (service/protocol.py)."""

from __future__ import annotations

import dataclasses

import pytest

from client.results import (
    ModelInfo,
    ProtocolError,
    Score,
    ScoreResponse,
    parse_error,
    parse_models,
    parse_score_response,
)
from service import protocol


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_copied_shapes_name_the_server_fields() -> None:
    assert _fields(Score) == set(protocol.ScoreResult.model_fields)
    assert _fields(ScoreResponse) == set(protocol.ScoreResponse.model_fields)
    assert _fields(ModelInfo) - {"raw"} <= set(protocol.ModelCard.model_fields)
    assert set(protocol.ErrorDetail.model_fields) == {"type", "message", "field"}


def _server_body(n: int = 2) -> dict:
    result = protocol.ScoreResult(
        reward=-1.0,
        heads={"a": -1.0, "b": 2.0},
        min=-1.0,
        max=2.0,
        mean=0.5,
        std=1.5,
        tokens=7,
        truncated=False,
    )
    body = protocol.ScoreResponse(
        model="m",
        version="1",
        aggregation="min",
        head_names=["a", "b"],
        results=[result] * n,
        usage=protocol.Usage(items=n, tokens=7 * n, truncated=0),
    )
    return body.model_dump(mode="json")


def test_parses_what_the_server_models_serialise() -> None:
    parsed = parse_score_response(_server_body(), expected=2)
    assert parsed.results[0] == Score(-1.0, {"a": -1.0, "b": 2.0}, -1.0, 2.0, 0.5, 1.5, 7, False)
    assert parsed.usage == {"items": 2, "tokens": 14, "truncated": 0}
    err = protocol.ErrorResponse(error=protocol.ErrorDetail(type="overloaded", message="full", field=None))
    e = parse_error(503, err.model_dump(), "http://x", 2.0)
    assert (e.status, e.type, e.message, e.retry_after) == (503, "overloaded", "full", 2.0)
    assert parse_error(502, "<html>bad gateway</html>", None, None).type == "http_error"


def test_heads_by_name_and_an_older_servers_list_parse_alike() -> None:
    body = _server_body()
    assert body["results"][0]["heads"] == {"a": -1.0, "b": 2.0}  # the server sends them by name
    body["results"][1]["heads"] = [-1.0, 2.0]  # an older server: a list in head order
    parsed = parse_score_response(body, expected=2)
    assert parsed.results[0].heads == parsed.results[1].heads == {"a": -1.0, "b": 2.0}


def test_std_percentile_is_parsed_and_optional() -> None:
    body = _server_body()
    assert body["results"][0]["std_percentile"] is None  # the server sends null for models without
    body["results"][1]["std_percentile"] = 97.5
    parsed = parse_score_response(body, expected=2)
    assert [r.std_percentile for r in parsed.results] == [None, 97.5]
    del body["results"][1]["std_percentile"]  # an older server: no field at all
    assert parse_score_response(body, expected=2).results[1].std_percentile is None


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b["results"].pop(), "expected 2 results"),
        (lambda b: b["results"][1].pop("reward"), r"results\[1\]\.reward"),
        (lambda b: b["results"][0].update(heads=[1.0]), r"results\[0\]\.heads"),
        (lambda b: b["results"][0].update(heads={"b": 2.0, "a": -1.0}), r"results\[0\]\.heads"),
        (lambda b: b["results"][0].update(heads={"a": -1.0, "b": "2"}), r"results\[0\]\.heads"),
        (lambda b: b["results"][0].update(tokens="7"), "tokens"),
        (lambda b: b["results"][0].update(truncated=0), "truncated"),
        (lambda b: b["results"][0].update(std_percentile="97"), "std_percentile"),
        (lambda b: b.update(head_names=None), "head_names"),
    ],
)
def test_a_wrong_shape_is_an_error_not_a_number(mutate, match) -> None:
    body = _server_body()
    mutate(body)
    with pytest.raises(ProtocolError, match=match):
        parse_score_response(body, expected=2)


def test_model_card_keeps_fields_newer_than_the_client(server) -> None:
    import httpx

    info = parse_models(httpx.get(f"{server.url}/v1/models").json())
    assert info.num_heads == len(info.head_names) and info.raw["id"] == info.id
