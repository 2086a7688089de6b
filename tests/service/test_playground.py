"""/playground: served by the app (HYDRA_RM_PLAYGROUND public/auth/off), and driven in a real browser.

The browser tests run Debian's chromium headless through Playwright (tests/service/playground_driver.py)
against a live uvicorn server with the embedded default model: they type three candidates, click
Score once, and check that every number the page renders is the one `/v1/score` answered. Where no
browser can run they skip, with the reason in pytest's summary. Set HYDRA_RM_PLAYGROUND_SCREENSHOT to
a path to also write the scored page there (the README's docs/img/playground.png).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scoring.settings import Settings
from service.routes.playground import PATHS
from tests.service import playground_driver as drv
from tests.service.conftest import Live, live_server

PROMPT = "Write a short review of the soup at the restaurant."
CANDIDATES = [
    "The soup was wonderful.",
    "Terrible soup. Cold, salty, and the waiter was rude.",
    "wonderful wonderful wonderful wonderful wonderful wonderful",
]
KEY = "playground-key"


# ---- served by the app (no browser needed) ----------------------------------------------------------


def test_page_and_assets_are_served_with_a_same_origin_policy(live: Live) -> None:
    with live.client() as c:
        got = {p: c.get(p) for p in sorted(PATHS)}
        schema = c.get("/openapi.json").json()
    assert got["/playground"].headers["content-type"].startswith("text/html")
    assert got["/playground/playground.js"].headers["content-type"].startswith("text/javascript")
    assert got["/playground/playground.css"].headers["content-type"].startswith("text/css")
    for path, r in got.items():
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff"
    html = got["/playground"].text
    assert 'src="playground/playground.js"' in html and 'href="playground/playground.css"' in html
    # Nothing on the page points off this origin: every URL it names is relative.
    for text in (html, got["/playground/playground.js"].text, got["/playground/playground.css"].text):
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I)
    assert not any(p.startswith("/playground") for p in schema["paths"])  # a page, not an API


def test_playground_setting_public_auth_off(tiny_engine: Any) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with live_server(Settings(api_keys=[KEY]), tiny_engine) as live:  # default: public, the API keyed
        page = httpx.get(f"{live.url}/playground", timeout=30)
        models = httpx.get(f"{live.url}/v1/models", timeout=30)
    assert page.status_code == 200
    assert models.status_code == 401  # the page never opens the API: it must send a key
    with live_server(Settings(api_keys=[KEY], playground="auth"), tiny_engine) as live:
        anonymous = {p: httpx.get(live.url + p, timeout=30) for p in PATHS}
        keyed = {p: httpx.get(live.url + p, headers=auth, timeout=30) for p in PATHS}
    assert all(r.status_code == 401 for r in anonymous.values()), {
        p: r.status_code for p, r in anonymous.items()
    }
    assert all(r.json()["error"]["type"] == "unauthorized" for r in anonymous.values())
    assert all(r.status_code == 200 for r in keyed.values())
    for keys in ([KEY], []):
        with live_server(Settings(api_keys=keys, playground="off"), tiny_engine) as live:
            off = {p: httpx.get(live.url + p, headers=auth, timeout=30) for p in PATHS}
        assert all(r.status_code == 404 for r in off.values()), keys
        assert all(r.json()["error"]["type"] == "not_found" for r in off.values())


def test_playground_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().playground == "public"
    assert Settings(api_keys=["k"]).playground == "public"  # unlike the docs: the page holds no server data
    monkeypatch.setenv("HYDRA_RM_PLAYGROUND", "off")
    assert Settings().playground == "off"
    monkeypatch.setenv("HYDRA_RM_PLAYGROUND", "auth")
    with pytest.raises(ValueError, match="playground=auth needs API keys"):
        Settings()  # guarding the page with no keys to check would silently leave it open
    monkeypatch.setenv("HYDRA_RM_PLAYGROUND", "sometimes")
    with pytest.raises(ValueError, match="playground"):
        Settings()


# ---- in a real browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = drv.unavailable()
    if reason:
        pytest.skip(f"no browser for the playground tests: {reason}")
    try:
        with drv.chromium() as b:
            yield b
    except RuntimeError as e:
        pytest.skip(f"no browser for the playground tests: {e}")


@pytest.fixture(scope="module")
def default_live(browser: Any) -> Iterator[Live]:
    """`hydra-rm serve`'s default: the embedded default model, default settings."""
    with live_server(Settings()) as server:
        yield server


@pytest.fixture()
def session(browser: Any, default_live: Live) -> Iterator[drv.Session]:
    with drv.open_session(browser, default_live.url) as s:
        drv.load(s, default_live.url)
        yield s
    assert not s.errors, s.errors
    assert not s.foreign_requests(), s.foreign_requests()


def _value(cell: dict[str, Any]) -> float:
    return float(cell["value"])


def _close_text(text: str, x: float) -> bool:
    """A number shown with 4 decimals is the API's value rounded (JS toFixed, ties aside)."""
    return re.fullmatch(r"-?\d+\.\d{4}", text) is not None and abs(float(text) - x) <= 0.5e-4 + 1e-12


def _check_rows(rows: list[dict[str, Any]], answer: dict[str, Any]) -> None:
    results = answer["results"]
    assert sorted(r["index"] for r in rows) == list(range(len(results)))
    for row in rows:
        res = results[row["index"]]
        cells = row["cells"]
        for col, key in (("min", "min"), ("mean", "mean"), ("uwo", "reward"), ("std", "std")):
            assert _value(cells[col]) == res[key], (row["index"], col)  # the very float the API sent
            assert _close_text(cells[col]["text"], res[key]), (row["index"], col, cells[col]["text"])
        if res["std_percentile"] is None:
            assert cells["std_percentile"]["value"] is None
        else:
            assert _value(cells["std_percentile"]) == res["std_percentile"]
            assert abs(float(cells["std_percentile"]["text"]) - res["std_percentile"]) <= 0.05 + 1e-9
        assert cells["tokens"]["text"] == str(res["tokens"])
        assert cells["truncated"]["text"] == ("yes" if res["truncated"] else "no")
        assert [h["head"] for h in row["heads"]] == list(range(len(res["heads"])))
        assert [float(h["value"]) for h in row["heads"]] == res["heads"]
        for h, name in zip(row["heads"], answer["head_names"], strict=True):
            assert h["title"].startswith(f"{name}: ")


def test_scores_three_candidates_and_renders_the_apis_numbers(
    session: drv.Session, default_live: Live, tmp_path: Path
) -> None:
    page = session.page
    with default_live.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    assert (
        page.locator(f'[data-model-id="{card["id"]}"]')
        .inner_text()
        .startswith(f"{card['id']}:{card['version']}")
    )
    drv.fill(session, PROMPT, CANDIDATES)
    body, status, answer = drv.click_score(session)
    assert status == 200
    # One request scores every candidate; min and mean come with every result, UWO is the reward.
    assert body == {
        "items": [{"prompt": PROMPT, "response": c} for c in CANDIDATES],
        "aggregation": "uwo",
        "return_heads": True,
        "uwo_lambda": card["uwo_lambda"],
    }
    rows = drv.read_table(session)
    assert [r["index"] for r in rows] == [0, 1, 2]
    _check_rows(rows, answer)
    # The same request sent by hand gets the same rewards (the batcher's guarantee: 1e-5).
    with default_live.client() as c:
        again = drv.in_head_order(c.post("/v1/score", json=body).json())
    for mine, theirs in zip(rows, again["results"], strict=True):
        assert math.isclose(_value(mine["cells"]["uwo"]), theirs["reward"], abs_tol=1e-5)
        assert all(
            math.isclose(float(h["value"]), t, abs_tol=1e-5)
            for h, t in zip(mine["heads"], theirs["heads"], strict=True)
        )
    assert answer["usage"]["items"] == 3
    summary = page.inner_text("#summary")
    assert f"{answer['usage']['tokens']} tokens" in summary and "3 items" in summary
    legend = page.inner_text("#legend")
    assert all(name in legend for name in answer["head_names"])
    page.select_option("#cmp-b", "2")  # the picture compares the plain review with the repeated word
    compared = drv.read_compare(session)
    assert (
        float(compared["head:0"]["diff"])
        == answer["results"][2]["heads"][0] - answer["results"][0]["heads"][0]
    )
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    target = os.environ.get("HYDRA_RM_PLAYGROUND_SCREENSHOT")
    if target:  # the README's picture, from this very page state
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target, full_page=True)


def test_columns_sort_and_compare_two_shows_each_heads_difference(session: drv.Session) -> None:
    page = session.page
    drv.fill(session, PROMPT, CANDIDATES)
    _, _, answer = drv.click_score(session)
    results = answer["results"]

    def order() -> list[int]:
        return [r["index"] for r in drv.read_table(session)]

    def by(key: Any, reverse: bool) -> list[int]:
        return sorted(range(len(results)), key=lambda i: key(results[i]), reverse=reverse)

    for col, key in (
        ("min", lambda r: r["min"]),
        ("uwo", lambda r: r["reward"]),
        ("std", lambda r: r["std"]),
        ("tokens", lambda r: r["tokens"]),
    ):
        page.click(f'th[data-col="{col}"] button.sort')  # numbers: highest first, then flips
        assert order() == by(key, True), col
        assert page.get_attribute(f'th[data-col="{col}"]', "aria-sort") == "descending"
        page.click(f'th[data-col="{col}"] button.sort')
        assert order() == by(key, False), col
    page.select_option('th[data-col="heads"] select', "2")  # sort by one head
    assert order() == by(lambda r: r["heads"][2], True)
    page.click('th[data-col="text"] button.sort')
    assert order() == sorted(range(3), key=lambda i: CANDIDATES[i])

    page.select_option("#cmp-a", "0")
    page.select_option("#cmp-b", "2")
    table = drv.read_compare(session)
    assert page.inner_text("#cmp-head-diff") == "C \u2212 A"
    a, b = results[0], results[2]
    for k, name in enumerate(answer["head_names"]):
        row = table[f"head:{k}"]
        assert row["name"] == name
        assert (float(row["a"]), float(row["b"])) == (a["heads"][k], b["heads"][k])
        assert float(row["diff"]) == b["heads"][k] - a["heads"][k]
        assert _close_text(row["diff_text"].lstrip("+"), b["heads"][k] - a["heads"][k])
    for key, field in (("min", "min"), ("mean", "mean"), ("uwo", "reward"), ("std", "std")):
        assert float(table[key]["diff"]) == b[field] - a[field], key


def test_chat_mode_scores_each_candidate_as_the_next_assistant_turn(
    session: drv.Session, default_live: Live
) -> None:
    page = session.page
    page.click("#mode-chat")
    assert page.input_value("#messages textarea") == PROMPT  # the prompt carries over as the user turn
    drv.fill(session, None, CANDIDATES[:2])
    body, status, answer = drv.click_score(session)
    assert status == 200
    assert body["items"] == [
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": c}]}
        for c in CANDIDATES[:2]
    ]
    _check_rows(drv.read_table(session), answer)
    # An error in the shared conversation points at that message, not at a candidate.
    page.evaluate("() => { document.querySelector('#messages textarea').value = 'hi \\ud800'; }")
    _, status, answer = drv.click_score(session)
    assert status == 422 and answer["error"]["field"] == "items[0].messages[0].content", answer
    assert "bad" in (page.get_attribute("#messages textarea", "class") or "")
    assert page.locator("#candidates textarea.bad").count() == 0
    session.errors.clear()  # the browser logs the 422 to its console


def test_errors_show_the_servers_message_and_field(session: drv.Session, default_live: Live) -> None:
    page = session.page
    drv.fill(session, PROMPT, CANDIDATES, uwo_lambda="-1")
    body, status, answer = drv.click_score(session)
    assert status == 422 and answer["error"]["field"] == "uwo_lambda"
    error = page.locator("#error")
    assert error.is_visible()
    assert page.inner_text("#error .message") == answer["error"]["message"]
    assert page.inner_text("#error .field") == "field: uwo_lambda"
    assert "HTTP 422" in error.inner_text() and "invalid_request" in error.inner_text()
    assert "bad" in (page.get_attribute("#uwo-lambda", "class") or "")
    # An item-level error points at its candidate: a lone surrogate is not text (JSON can carry one).
    drv.fill(session, PROMPT, CANDIDATES, uwo_lambda="1")
    page.evaluate("() => { document.querySelectorAll('#candidates textarea')[1].value = 'bad \\ud800'; }")
    body, status, answer = drv.click_score(session)
    assert status == 422 and answer["error"]["field"] == "items[1].response", answer
    assert page.inner_text("#error .field") == "field: items[1].response"
    assert page.inner_text("#error .message") == answer["error"]["message"]
    marked = page.evaluate(
        "() => [...document.querySelectorAll('#candidates textarea')].map(t => t.classList.contains('bad'))"
    )
    assert marked == [False, True, False]
    # A good request clears the error.
    drv.fill(session, PROMPT, CANDIDATES)
    assert drv.click_score(session)[1] == 200
    assert not page.locator("#error").is_visible()
    session.errors.clear()  # the browser logs each 4xx fetch to its console; those were the point here


def test_optional_novelty_columns_show_when_the_server_sends_them(session: drv.Session) -> None:
    """The embedded default carries the novelty statistic: its answers' `novelty` /
    `novelty_percentile` get two columns, exactly the served floats; an answer without them gets none."""
    page = session.page
    drv.fill(session, PROMPT, CANDIDATES)
    _, _, answer = drv.click_score(session)
    assert all(r["novelty"] is not None for r in answer["results"])  # the default's statistic
    rows = drv.read_table(session)
    for row in rows:
        res = answer["results"][row["index"]]
        assert _value(row["cells"]["novelty"]) == res["novelty"]
        assert _value(row["cells"]["novelty_percentile"]) == res["novelty_percentile"]

    def drop_novelty(route: Any) -> None:  # a server whose model has no statistic: the keys are absent
        data = route.fetch().json()
        for r in data["results"]:
            r.pop("novelty", None)
            r.pop("novelty_percentile", None)
        route.fulfill(json=data)

    page.route("**/v1/score", drop_novelty)
    drv.click_score(session)
    assert "novelty" not in drv.read_table(session)[0]["cells"]  # absent from the answer: no column
    page.unroute("**/v1/score")

    def null_novelty(route: Any) -> None:  # a server whose model has no novelty reference
        data = route.fetch().json()
        for r in data["results"]:
            r["novelty"] = r["novelty_percentile"] = None
        route.fulfill(json=data)

    page.route("**/v1/score", null_novelty)
    drv.click_score(session)
    cells = drv.read_table(session)[0]["cells"]
    assert "novelty" not in cells and "novelty_percentile" not in cells  # all null: no empty column
    page.unroute("**/v1/score")


def test_with_api_keys_the_page_asks_for_a_key_and_sends_it(
    browser: Any, tiny_engine: Any, tmp_path: Path
) -> None:
    with live_server(Settings(api_keys=[KEY]), tiny_engine) as live, drv.open_session(browser, live.url) as s:
        page = s.page
        drv.load(s, live.url)
        assert page.locator("#key-panel").is_visible()
        assert "missing API key" in page.inner_text("#key-message")
        assert page.is_disabled("#score")
        page.screenshot(path=str(tmp_path / "key-prompt.png"))
        page.fill("#key-input", "wrong-key")
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as wrong:
            page.click("#key-form button")
        assert wrong.value.status == 401
        page.wait_for_function("() => document.getElementById('key-message').textContent.includes('invalid')")
        assert "invalid API key" in page.inner_text("#key-message")
        page.fill("#key-input", KEY)
        with page.expect_response(lambda r: r.url.endswith("/v1/models")) as right:
            page.click("#key-form button")
        assert right.value.status == 200
        page.wait_for_selector("#score:not([disabled])")
        assert not page.locator("#key-panel").is_visible()
        name = live.service.engine.name
        assert page.locator(f'[data-model-id="{name}"]').is_visible()
        drv.fill(s, "Say hi.", ["hi", "hello there", "go away"])
        _, status, answer = drv.click_score(s)
        assert status == 200
        scored = [r for r in s.requests if r.url.endswith("/v1/score")]
        assert scored and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in scored)
        _check_rows(drv.read_table(s), answer)
        s.errors.clear()  # the two 401s are logged by the browser
        assert not s.foreign_requests()


def test_a_stdp_column_shows_the_servers_stdp_for_a_model_with_a_std_reference(
    session: drv.Session, default_live: Live
) -> None:
    """The embedded default has the head-std reference `stdp` reads: the page shows the server's own
    `stdp` reward per candidate (a second request, the server's beta), in the column's label too."""
    with default_live.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    assert card["disagreement"] is not None
    drv.fill(session, PROMPT, CANDIDATES)
    drv.click_score(session)
    with default_live.client() as c:
        want = c.post(
            "/v1/score",
            json={"items": [{"prompt": PROMPT, "response": t} for t in CANDIDATES], "aggregation": "stdp"},
        ).json()
    rows = drv.read_table(session)
    assert len(rows) == len(CANDIDATES)
    for row in rows:
        got = _value(row["cells"]["stdp"])
        assert math.isclose(got, want["results"][row["index"]]["reward"], abs_tol=1e-5)
    labels = session.page.locator("#thead th").all_inner_texts()
    assert any(t.startswith(f"stdp \u03b2={want['stdp_beta']:g}") for t in labels), labels
    session.page.select_option("#cmp-b", "2")  # compare A with C: the stdp row is their difference
    row = drv.read_compare(session)["stdp"]
    a, c = (want["results"][i]["reward"] for i in (0, 2))
    assert math.isclose(float(row["a"]), a, abs_tol=1e-5) and math.isclose(float(row["b"]), c, abs_tol=1e-5)
    assert math.isclose(float(row["diff"]), c - a, abs_tol=1e-5)
