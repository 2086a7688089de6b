"""API keys: scoring and model routes need one when configured; probes and metrics stay open."""

from __future__ import annotations

import pytest

from scoring.settings import Settings
from service.auth import key_matches
from tests.service.conftest import live_server


@pytest.fixture(scope="module")
def secured(tiny_engine):
    with live_server(Settings(api_keys=["first-key", "second-key"]), tiny_engine) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/score", {"items": [{"text": "hi"}]}), ("/get_reward", {"query": ["hi"]}), ("/v1/models", None)],
)
def test_protected_routes_need_a_valid_key(secured, path, body):
    def call(headers):
        with secured.client(headers=headers) as c:
            return c.post(path, json=body) if body is not None else c.get(path)

    missing = call({})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    assert call({"Authorization": "Bearer first-key-but-longer"}).status_code == 401
    assert call({"Authorization": "Bearer first-ke"}).status_code == 401
    assert call({"Authorization": "Basic Zmlyc3Qta2V5"}).status_code == 401
    assert call({"Authorization": "Bearer first-key"}).status_code == 200
    assert call({"Authorization": "Bearer second-key"}).status_code == 200


def test_health_and_metrics_stay_open(secured):
    with secured.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200
    assert 'hydra_rm_rejected_requests_total{reason="unauthorized"}' in metrics.text


def test_openapi_declares_the_bearer_scheme_when_keys_are_set(secured):
    with secured.client() as c:  # with keys set the schema itself needs one (HYDRA_RM_DOCS)
        spec = c.get("/openapi.json", headers={"Authorization": "Bearer first-key"}).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/score"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_no_keys_means_no_auth(live):
    with live.client() as c:
        assert c.post("/get_reward", json={"query": ["hi"]}).status_code == 200


def test_key_comparison():
    from pydantic import SecretStr

    keys = [SecretStr("alpha"), SecretStr("beta")]
    assert key_matches("beta", keys)
    assert not key_matches("bet", keys)
    assert not key_matches("", keys)
    assert not key_matches("alpha", [])
    assert key_matches("ünï", [SecretStr("ünï")])


def test_api_keys_come_from_a_comma_separated_variable(monkeypatch):
    monkeypatch.setenv("HYDRA_RM_API_KEYS", " k1 , k2,")
    assert [k.get_secret_value() for k in Settings().api_keys] == ["k1", "k2"]
    monkeypatch.setenv("HYDRA_RM_API_KEYS", "")
    assert Settings().api_keys == []
    assert "k1" not in repr(Settings(api_keys=["k1"]))


def test_unauthenticated_body_is_never_parsed(tiny_engine) -> None:
    """401 comes before the body is read: a malformed body without a key is still a 401, not a 422."""
    import httpx

    from scoring.settings import Settings
    from tests.service.conftest import live_server

    with live_server(Settings(api_keys="k1"), tiny_engine) as live:
        r = httpx.post(
            f"{live.url}/v1/score", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = httpx.post(
            f"{live.url}/get_reward", json={"query": ["x"]}, headers={"Authorization": "Bearer k2"}
        )
        assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
        r = httpx.post(
            f"{live.url}/get_reward", json={"query": ["x"]}, headers={"Authorization": "Bearer k1"}
        )
        assert r.status_code == 200 and len(r.json()["rewards"]) == 1
        assert live.metric("hydra_rm_rejected_requests_total", {"reason": "unauthorized"}) == 2
