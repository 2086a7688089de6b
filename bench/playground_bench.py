"""What /playground costs a person: bytes over the wire and the time to first score, against the
embedded default model (what `hydra-rm serve` serves with no settings).

Each round opens the page in a fresh browser context (cold cache, no sessionStorage) of Debian's
chromium, waits until the model is listed, clicks Score once on the page's example (three candidates)
and waits for the table. Beside it, in alternating rounds, the floor: the page's API calls
(`GET /v1/models`, the same `POST /v1/score` body, and for a model with a std reference the page's
second `POST /v1/score` with `aggregation: "stdp"`) made directly with httpx. Bytes are what
Chromium reports per request (`request.sizes()`: headers + body as received, no compression).

Usage: `python bench/playground_bench.py [--rounds 10]`; writes bench/results/playground-cpu.md.
Driving code: tests/service/playground_driver.py (the browser test's).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _bytes(request: Any) -> int:
    sizes = request.sizes()
    return (
        sizes["responseHeadersSize"]
        + sizes["responseBodySize"]
        + sizes["requestHeadersSize"]
        + sizes["requestBodySize"]
    )


def page_round(browser: Any, url: str) -> dict[str, Any]:
    from tests.service import playground_driver as drv

    with drv.open_session(browser, url) as s:
        t0 = time.perf_counter()
        drv.load(s, url)
        t_ready = time.perf_counter() - t0
        body, status, _ = drv.click_score(s)
        s.page.wait_for_selector("#tbody tr")
        t_scored = time.perf_counter() - t0
        assert status == 200 and not s.errors and not s.foreign_requests(), (status, s.errors)
        marks = s.page.evaluate(
            "() => Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))"
        )
        by_path: dict[str, int] = {}
        for r in s.requests:
            path = r.url[len(url) :] or "/"
            by_path[path] = by_path.get(path, 0) + _bytes(r)
    return {
        "ready": t_ready,
        "scored": t_scored,
        "page_ready": marks["hydra-models-listed"] / 1e3,  # since the navigation started, page clock
        "page_scored": marks["hydra-scored"] / 1e3,
        "page_score_call": (marks["hydra-scored"] - marks["hydra-score-sent"]) / 1e3,
        "bytes": by_path,
        "body": body,
    }


def api_round(url: str, body: dict[str, Any]) -> float:
    import httpx

    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as c:  # a fresh connection, as a fresh page has
        models = c.get("/v1/models")
        models.raise_for_status()
        c.post("/v1/score", json=body).raise_for_status()
        if models.json()["data"][0].get("disagreement"):  # the page's stdp column
            c.post("/v1/score", json={"items": body["items"], "aggregation": "stdp"}).raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "playground-cpu.md")
    args = ap.parse_args()

    import torch

    from scoring.settings import Settings
    from tests.service import playground_driver as drv
    from tests.service.conftest import live_server

    torch.set_num_threads(1)  # as the tests: the default model is tiny
    load_before = os.getloadavg()
    pages: list[dict[str, Any]] = []
    apis: list[float] = []
    with live_server(Settings()) as live, drv.chromium() as browser:
        warm = page_round(
            browser, live.url
        )  # warm-up: first page in the browser, first forward of each shape
        api_round(live.url, warm["body"])
        for _ in range(args.rounds):
            pages.append(page_round(browser, live.url))
            apis.append(api_round(live.url, pages[-1]["body"]))
        version = browser.version
    load_after = os.getloadavg()

    def ms(xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return f"{1e3 * statistics.median(xs):.0f} ms (IQR {1e3 * q[0]:.0f}-{1e3 * q[2]:.0f})"

    paths = sorted({p for r in pages for p in r["bytes"]})
    size = {p: statistics.median(r["bytes"].get(p, 0) for r in pages) for p in paths}
    assets = sum(v for p, v in size.items() if p.startswith("/playground"))
    own = [p["page_ready"] + p["page_score_call"] for p in pages]
    ratio = [o / a for o, a in zip(own, apis, strict=True)]
    lines = [
        "# /playground: page weight and time to first score (embedded default model, CPU)",
        "",
        f"Command: `.venv/bin/python bench/playground_bench.py --rounds {args.rounds}`. "
        f"{platform.node()}, {os.cpu_count()} cores, Chromium {version} headless (Playwright), "
        f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after (shared machine), "
        f"niceness {os.nice(0)}.",
        "",
        "Bytes per request (median over rounds; headers + body, as Chromium received them, uncompressed):",
        "",
        "| request | bytes |",
        "|---|---|",
        *(f"| `{p}` | {size[p]:,.0f} |" for p in paths),
        f"| **page itself (HTML + CSS + JS)** | **{assets:,.0f}** |",
        f"| **everything to the first score** | **{sum(size.values()):,.0f}** |",
        "",
        f"Times ({args.rounds} rounds, page and bare API alternating):",
        "",
        "| what | median |",
        "|---|---|",
        f"| page clock: navigation start -> model listed, Score enabled | {ms([p['page_ready'] for p in pages])} |",
        f"| page clock: click -> table rendered (the `/v1/score` calls + render) | "
        f"{ms([p['page_score_call'] for p in pages])} |",
        f"| **time to first score: the two above, per round (a click the moment Score is enabled)** | "
        f"**{ms(own)}** |",
        f"| the same API calls by httpx on a fresh connection (the floor) | {ms(apis)} |",
        f"| time to first score / floor, paired per round | {statistics.median(ratio):.2f}x |",
        f"| test clock: `goto` -> first score rendered, Playwright's own click latency included | "
        f"{ms([p['scored'] for p in pages])} |",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
