"""Ray Serve deployment: same API and rewards as the in-process engine; OpenRLHF's burst, none lost."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from scoring.settings import Settings
from tests.client.conftest import free_port, reference, texts
from tests.ray.conftest import time_limit

serve = pytest.importorskip("ray.serve")
aiohttp = pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_llama_dir, tmp_path_factory) -> Iterator[str]:
    from service import ray_serve

    settings = Settings(model=str(tiny_llama_dir), store_root=tmp_path_factory.mktemp("store"))
    port = free_port()
    with time_limit(180, "deploying on Ray Serve"):
        url = ray_serve.run(settings, replicas=2, num_cpus=0.5, host="127.0.0.1", port=port)
    yield url
    with time_limit(60, "deleting the Serve app"):
        serve.delete(ray_serve.APP_NAME)


def test_serve_gives_the_engine_rewards_through_the_same_api(served, tiny_engine):
    items = texts(40, "serve")
    with httpx.Client(base_url=served, timeout=60) as c:
        assert c.get("/readyz").json()["status"] == "ready"
        card = c.get("/v1/models").json()["data"][0]
        body = c.post("/v1/score", json={"items": [{"text": t} for t in items]}).json()
        bad = c.post("/v1/score", json={"items": [{"txt": "typo"}]})
        metrics = c.get("/metrics").text
    assert card["head_names"] == tiny_engine.head_names
    expected = reference(tiny_engine, items)
    assert [r["reward"] for r in body["results"]] == pytest.approx([e["reward"] for e in expected], abs=1e-5)
    flat = [h for r in body["results"] for h in r["heads"].values()]
    assert flat == pytest.approx([h for e in expected for h in e["heads"]], abs=1e-5)
    assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("items[0]")
    assert "hydra_rm_items_scored_total" in metrics  # a replica's own Prometheus text


async def _openrlhf_post(url: str, data: dict, try_max_times: int = 5) -> dict:
    """OpenRLHF 0.11's SingleTurnAgentExecutor._fetch_rewards_via_http, per sample: a new aiohttp session
    per request, 180 s total timeout, raise_for_status, 5 tries 1 s apart, then an error (None reward)."""
    timeout = aiohttp.ClientTimeout(total=180)
    for _ in range(try_max_times):
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(url, json=data) as response:
                    response.raise_for_status()
                    return await response.json()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError(
        f"Request error for {try_max_times} times, returning None. Please check the API server."
    )


async def test_openrlhf_burst_of_256_single_sample_requests_none_lost(served, tiny_engine):
    queries = texts(256, "burst")
    tasks = [
        _openrlhf_post(f"{served}/get_reward", {"query": [q], "prompts": [q.split(":")[0]], "labels": [None]})
        for q in queries
    ]
    with time_limit(240, "the burst"):
        answers = await asyncio.gather(*tasks, return_exceptions=True)
    lost = [i for i, a in enumerate(answers) if isinstance(a, BaseException)]
    assert lost == []
    expected = reference(tiny_engine, queries)
    # What OpenRLHF reads: `scores`, falling back to `rewards`; extra_logs holds one number per key.
    got = [(a.get("scores") or a["rewards"])[0] for a in answers]
    assert got == pytest.approx([e["reward"] for e in expected], abs=1e-5)
    for a, e in zip(answers, expected, strict=True):
        assert a["extra_logs"]["reward_std"] == [pytest.approx(a["extra_logs"]["reward_std"][0])]
        assert [a["extra_logs"][n][0] for n in tiny_engine.head_names] == pytest.approx(e["heads"], abs=1e-5)
