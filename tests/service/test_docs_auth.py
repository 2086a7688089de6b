"""HYDRA_RM_DOCS: /docs, /redoc and /openapi.json show the server's head indices and item limits, so a
server with API keys guards them by default; `public` opens them, `off` removes them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from scoring.settings import Settings
from tests.service.conftest import live_server

DOC_PATHS = ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"]
KEY = {"Authorization": "Bearer docs-key"}


def _get_all(url: str, headers: dict[str, str] | None = None) -> dict[str, httpx.Response]:
    with httpx.Client(base_url=url, timeout=30, headers=headers or {}) as c:
        return {p: c.get(p) for p in DOC_PATHS}


def test_with_api_keys_the_docs_need_a_key_unless_made_public(tiny_engine: Any) -> None:
    with live_server(Settings(api_keys=["docs-key"]), tiny_engine) as live:
        anonymous = _get_all(live.url)
        keyed = _get_all(live.url, KEY)
        wrong = _get_all(live.url, {"Authorization": "Bearer nope"})
        scored = httpx.post(f"{live.url}/get_reward", json={"query": ["hi"]}, headers=KEY)
    for path in DOC_PATHS:
        assert anonymous[path].status_code == 401, path
        assert anonymous[path].json()["error"]["type"] == "unauthorized"
        assert "head:3" not in anonymous[path].text
        assert wrong[path].status_code == 401, path
        assert keyed[path].status_code == 200, path
    spec = keyed["/openapi.json"].json()
    enum = spec["components"]["schemas"]["ScoreRequest"]["properties"]["aggregation"]["anyOf"][0]["enum"]
    assert "head:3" in enum  # with the key, the real schema of this server
    assert scored.status_code == 200
    # The operator can open them again; the scoring routes keep their auth.
    with live_server(Settings(api_keys=["docs-key"], docs="public"), tiny_engine) as live:
        opened = _get_all(live.url)
        protected = httpx.get(f"{live.url}/v1/models", timeout=30)
    assert all(r.status_code == 200 for r in opened.values()), {p: r.status_code for p, r in opened.items()}
    assert protected.status_code == 401


@pytest.mark.parametrize("keys", [["docs-key"], []], ids=["with-keys", "without-keys"])
def test_docs_off_removes_them(tiny_engine: Any, keys: list[str]) -> None:
    with live_server(Settings(api_keys=keys, docs="off"), tiny_engine) as live:
        got = _get_all(live.url, KEY)
        models = httpx.get(f"{live.url}/v1/models", headers=KEY, timeout=30)
    for path, r in got.items():
        assert r.status_code == 404, path
        assert r.json()["error"]["type"] == "not_found"
    assert models.status_code == 200


def test_docs_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().resolved_docs() == "public"
    assert Settings(api_keys=["k"]).resolved_docs() == "auth"
    monkeypatch.setenv("HYDRA_RM_DOCS", "off")
    assert Settings(api_keys=["k"]).resolved_docs() == "off"
    monkeypatch.setenv("HYDRA_RM_DOCS", "sometimes")
    with pytest.raises(ValueError, match="docs"):
        Settings()
    monkeypatch.setenv("HYDRA_RM_DOCS", "auth")
    with pytest.raises(ValueError, match="needs API keys"):
        Settings()  # guarding the docs with no keys to check would silently leave them open
