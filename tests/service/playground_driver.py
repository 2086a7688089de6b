"""Drives /playground in Debian's chromium through Playwright: shared by tests/service/test_playground.py
and bench/playground_bench.py, so the README screenshot and the measured numbers come from the code
path the test checks.

Playwright is pointed at the system browser (`executable_path`); `playwright install` (which
downloads a browser build) is never needed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT = {"width": 1280, "height": 900}


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def unavailable() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"playwright is not installed ({e}); it is pinned in requirements.lock"
    if chromium_path() is None:
        return "no chromium binary on PATH: `make test` installs Debian's chromium (apt-get install chromium)"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless system chromium; raises RuntimeError naming the cause when it cannot start."""
    from playwright.sync_api import Error, sync_playwright

    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium_path(), headless=True)
        except Error as e:
            raise RuntimeError(f"chromium at {chromium_path()} did not start: {e}") from e
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Session:
    """One page in a fresh browser context (no cache, no sessionStorage) and what it did."""

    page: Any
    origin: str
    requests: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def foreign_requests(self) -> list[str]:
        return [
            r.url for r in self.requests if _origin(r.url) != self.origin and not r.url.startswith("data:")
        ]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@contextmanager
def open_session(browser: Any, base_url: str) -> Iterator[Session]:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    session = Session(page, _origin(base_url))
    page.on("request", lambda r: session.requests.append(r))
    page.on("pageerror", lambda e: session.errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: session.errors.append(m.text) if m.type == "error" else None)
    try:
        yield session
    finally:
        context.close()


def load(session: Session, base_url: str) -> None:
    """Open the page and wait until it has listed the models (or asked for a key)."""
    page = session.page
    page.goto(f"{base_url}/playground")
    page.wait_for_function(
        "() => !document.getElementById('score').disabled || !document.getElementById('key-panel').hidden"
    )


def fill(session: Session, prompt: str | None, candidates: list[str], uwo_lambda: str | None = None) -> None:
    """Type the prompt and exactly these candidates (adding or removing candidate boxes)."""
    page = session.page
    if prompt is not None:
        page.fill("#prompt", prompt)
    while page.locator("#candidates textarea").count() > len(candidates):
        page.locator("#candidates .x").last.click()
    while page.locator("#candidates textarea").count() < len(candidates):
        page.click("#add-candidate")
    for i, text in enumerate(candidates):
        page.locator("#candidates textarea").nth(i).fill(text)
    if uwo_lambda is not None:
        page.fill("#uwo-lambda", uwo_lambda)


def click_score(session: Session) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """One click on Score: (the body the page sent, the status, the JSON /v1/score answered it)."""
    page = session.page
    with page.expect_response(lambda r: r.url.endswith("/v1/score")) as info:
        page.click("#score")
    response = info.value
    body = json.loads(response.request.post_data or "null")
    answer = in_head_order(response.json())
    page.wait_for_function("() => document.getElementById('score').textContent === 'Score'")
    return body, response.status, answer


def in_head_order(answer: dict[str, Any]) -> dict[str, Any]:
    """/v1/score gives each result's heads by name; the page (and these checks) work in head order."""
    for r in answer.get("results", []):
        if isinstance(r.get("heads"), dict):
            r["heads"] = [r["heads"][n] for n in answer["head_names"]]
    return answer


def read_table(session: Session) -> list[dict[str, Any]]:
    """The results table as rendered, top to bottom: per row its index, each cell's text and
    data-value, and the head bars' values."""
    return session.page.evaluate(
        """() => [...document.querySelectorAll('#tbody tr')].map(tr => ({
            index: Number(tr.dataset.index),
            cells: Object.fromEntries([...tr.querySelectorAll('td')].map(td =>
                [td.dataset.col, {text: td.textContent, value: td.dataset.value ?? null}])),
            heads: [...tr.querySelectorAll('.hb')].map(b => ({head: Number(b.dataset.head),
                value: b.dataset.value, title: b.title})),
        }))"""
    )


def read_compare(session: Session) -> dict[str, dict[str, Any]]:
    """The compare-two table: row key (`head:<k>`, `min`, `mean`, `uwo`, `stdp` where shown, `std`) -> A, B, diff."""
    return session.page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#cmp-body tr')].map(tr => {
            const td = tr.querySelectorAll('td');
            return [tr.dataset.row, {name: td[0].textContent,
                a: td[1].dataset.value, b: td[2].dataset.value, diff: td[3].dataset.value,
                diff_text: td[3].textContent}];
        }))"""
    )
