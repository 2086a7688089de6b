"""`score-ray` on a busy cluster says why it waits and gives up after --wait-s (it sat silently at
"pending: 2 CPU" while a Serve app held the CPUs); chunks are sized from the file and the actor count
(the default 512 made a 200-line file one task); Ray's bind address and dashboard port are settable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.ray.conftest import time_limit

pytest.importorskip("ray.data")


def _input(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(n)))
    return path


def test_chunks_are_sized_from_the_file_and_the_actors() -> None:
    from jobs.ray_job import auto_chunk_size

    assert auto_chunk_size(200, actors=2) == 25  # 8 tasks: 4 per actor, not one task of 200
    assert auto_chunk_size(3, actors=4) == 1
    assert auto_chunk_size(10**6, actors=2) == 512  # capped: a chunk is also the checkpoint unit


def test_a_cluster_without_free_cpus_is_reported_and_given_up_on(
    ray_cluster, tiny_llama_dir, tmp_path: Path
) -> None:
    import ray

    @ray.remote(num_cpus=2)
    class Hog:  # holds both CPUs of the test cluster, as a Serve app did
        def ping(self) -> int:
            return 1

    hog = Hog.remote()  # type: ignore[attr-defined]
    ray.get(hog.ping.remote())
    try:
        args = ["score-ray", "-i", str(_input(tmp_path, 20)), "-o", str(tmp_path / "out.jsonl"),
                "--model", str(tiny_llama_dir), "--store", str(tmp_path / "store"), "--actors", "2",
                "--num-cpus", "0.5", "--wait-s", "3", "--no-progress"]  # fmt: skip
        start = time.monotonic()
        with time_limit(240, "score-ray on a full cluster"):
            res = CliRunner().invoke(app, args)
        elapsed = time.monotonic() - start
    finally:
        ray.kill(hog)
    assert res.exit_code == 1, res.output
    assert "waiting for 1 CPU" in res.output and "0 of 2 CPU free" in res.output
    assert "gave up after 3 s" in res.output
    assert elapsed < 120


def test_ray_bind_address_and_dashboard_port_reach_ray_init(monkeypatch, tmp_path: Path) -> None:
    import ray

    seen: dict = {}

    def fake_init(**kwargs):  # noqa: ANN202
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(ray, "init", fake_init)
    args = ["score-ray", "-i", str(_input(tmp_path, 2)), "-o", str(tmp_path / "o.jsonl"),
            "--ray-host", "127.0.0.1", "--dashboard-port", "8299"]  # fmt: skip
    CliRunner().invoke(app, args)
    assert seen.get("_node_ip_address") == "127.0.0.1" and seen.get("dashboard_host") == "127.0.0.1"
    assert seen.get("dashboard_port") == 8299 and seen.get("include_dashboard") is True
