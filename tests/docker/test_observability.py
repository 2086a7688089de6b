"""Every Grafana panel query and alert rule, evaluated by a real Prometheus that scraped the real service."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from scoring.settings import Settings
from tests.service.conftest import live_server

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "hydra-rm.json"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")

if PROMETHEUS is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the observability tests: install prometheus (make test does this)")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus binary not installed (apt-get install prometheus)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "hydra-prometheus"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    assert "disagreement" in titles


@pytest.fixture(scope="module")
def engine_with_quantiles(tiny_engine):
    """The tiny model with disagreement quantiles fitted as training fits them (fit_quantiles over the
    served stds of a reference set), so the drift-share panel has a p95 to count against."""
    from dataclasses import replace

    from model_store.uncertainty import fit_quantiles
    from scoring.engine import Item, ScoringEngine

    ref = [Item(prompt=f"question {n}", response="an answer " * (1 + n % 7)) for n in range(200)]
    q = fit_quantiles([s.std for s in tiny_engine.score(ref)])
    rm = replace(tiny_engine.rm, manifest=tiny_engine.manifest.model_copy(update={"disagreement": q}))
    return ScoringEngine(rm, policy=tiny_engine.policy)


@pytest.fixture(scope="module")
def scraped(engine_with_quantiles, tmp_path_factory: pytest.TempPathFactory):
    """A live service under steady traffic, scraped every second by a real Prometheus."""
    tmp = tmp_path_factory.mktemp("prom")
    with live_server(Settings(max_length=64), engine_with_quantiles) as live:
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=live.url, timeout=30) as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    items = [
                        {"prompt": f"question {n}", "response": "an answer " * (1 + n % 7)},
                        {"text": "word " * 80},
                    ]
                    c.post("/v1/score", json={"items": items})
                    c.post(
                        "/get_reward",
                        json={"query": [f"prompt {n} response"], "prompts": ["p"], "labels": [None]},
                    )
                    c.post("/v1/score", json={"items": []})  # rejected: 422
                    stop.wait(0.1)

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        port = _free_port()
        shutil.copy(ALERTS, tmp / "alerts.yml")
        target = live.url.removeprefix("http://")
        (tmp / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [alerts.yml]\n"
            f"scrape_configs:\n  - job_name: hydra-rm\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        prom = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, "prometheus exited"
                assert time.monotonic() < deadline, "prometheus did not scrape the service in time"
                try:
                    r = httpx.get(
                        f"{prom}/api/v1/query", params={"query": 'count_over_time(up{job="hydra-rm"}[1m])'}
                    )
                    res = r.json()["data"]["result"]
                    if res and float(res[0]["value"][1]) >= 6:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.5)
            yield prom
        finally:
            stop.set()
            proc.terminate()
            proc.wait(timeout=30)
            worker.join(30)


@pytest.mark.parametrize(("title", "expr"), _panel_queries())
def test_every_panel_query_returns_data(scraped: str, title: str, expr: str) -> None:
    r = httpx.get(f"{scraped}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    assert result, f"panel {title!r}: {expr} returned no series"
    values = [float(s["value"][1]) for s in result]
    assert all(v == v for v in values), f"panel {title!r}: {expr} returned NaN ({values})"


def test_disagreement_panel_sees_real_spread(scraped: str) -> None:
    q = "sum(rate(hydra_rm_head_disagreement_sum[1m])) / sum(rate(hydra_rm_head_disagreement_count[1m]))"
    value = float(
        httpx.get(f"{scraped}/api/v1/query", params={"query": q}).json()["data"]["result"][0]["value"][1]
    )
    assert value > 0  # the tiny model's heads disagree, so the mean std is positive


def test_drift_panel_is_a_share_of_the_scored_items(scraped: str) -> None:
    (expr,) = [e for t, e in _panel_queries() if "reference p95" in t]
    result = httpx.get(f"{scraped}/api/v1/query", params={"query": expr}).json()["data"]["result"]
    assert len(result) == 1 and 0.0 <= float(result[0]["value"][1]) <= 1.0
    above = httpx.get(
        f"{scraped}/api/v1/query", params={"query": "hydra_rm_items_above_reference_p95_total"}
    ).json()["data"]["result"]
    assert len(above) == 1  # the counter is exported (the model has quantiles) and was scraped


def test_alert_rules_load_and_evaluate(scraped: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        groups = httpx.get(f"{scraped}/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, "rules were not evaluated"
        time.sleep(0.5)
    assert len(rules) == 6
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = {r["name"] for r in rules if r["state"] != "inactive"}
    assert "HydraRMDown" not in firing and "HydraRMNotReady" not in firing


def test_promtool_accepts_the_shipped_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    out = subprocess.run(
        [promtool, "check", "config", str(ROOT / "docker" / "prometheus" / "prometheus.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_per_head_panel_has_one_series_per_head(scraped: str, tiny_engine) -> None:
    q = "histogram_quantile(0.5, sum by (le, head) (rate(hydra_rm_head_reward_bucket[1m])))"
    result = httpx.get(f"{scraped}/api/v1/query", params={"query": q}).json()["data"]["result"]
    assert sorted(s["metric"]["head"] for s in result) == sorted(tiny_engine.head_names)
