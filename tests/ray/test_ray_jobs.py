"""`score-ray`: Ray Data scores a JSONL file into the local job's output, in order, errors kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.local import ScoreJob
from model_store.aggregation import Aggregation
from tests.client.conftest import texts
from tests.ray.conftest import time_limit

pytest.importorskip("ray.data")


def _write_input(path: Path) -> None:
    lines: list[bytes] = []
    for i, t in enumerate(texts(50, "data")):
        obj = {"id": f"r{i}", "text": t} if i % 3 else {"prompt": f"q{i}?", "response": t}
        lines.append(json.dumps(obj).encode())
    lines[4] = b"{not json"
    lines[11] = b'{"prompt": "only a prompt"}'
    lines[20] = b""
    lines[33] = b'{"text": "bad \xff byte"}'
    lines[47] = b"[1, 2]"
    path.write_bytes(b"\n".join(lines) + b"\n")


def _score_ray(src: Path, out: Path, model: Path, store: Path):
    from typer.testing import CliRunner

    from cli.main import app

    args = ["score-ray", "-i", str(src), "-o", str(out), "--model", str(model), "--store", str(store)]
    args += [
        "--chunk-size",
        "7",
        "--actors",
        "2",
        "--num-cpus",
        "0.5",
        "--aggregation",
        "mean",
        "--no-progress",
    ]
    with time_limit(300, "score-ray"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_score_ray_matches_the_local_job_in_order_with_errors(
    ray_cluster, tiny_engine, tiny_llama_dir, tmp_path
):
    """Two actors (which Ray Data would reorder without preserve_order), chunks of 7 lines, bad lines."""
    src = tmp_path / "in.jsonl"
    _write_input(src)
    mean = Aggregation.parse("mean", tiny_engine.num_heads)
    local = ScoreJob(tiny_engine, src, tmp_path / "local.jsonl", aggregation=mean, chunk_size=7)
    assert (local.run(progress_bar=False).scored, local.errors.name) == (45, "local.errors.jsonl")
    output = _score_ray(src, tmp_path / "ray.jsonl", tiny_llama_dir, tmp_path / "store")
    assert "scored 45 items, 5 errors" in output

    # The errors file is the local job's, byte for byte (same line numbers, fields and reasons).
    assert (tmp_path / "ray.errors.jsonl").read_bytes() == (tmp_path / "local.errors.jsonl").read_bytes()
    errors = [json.loads(x) for x in (tmp_path / "ray.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [5, 12, 21, 34, 48]

    ray_rows = [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert [r["line"] for r in ray_rows] == [r["line"] for r in local_rows]  # input order
    assert [r["line"] for r in ray_rows] == sorted({*range(1, 51)} - {5, 12, 21, 34, 48})
    for r, loc in zip(ray_rows, local_rows, strict=True):
        assert r.keys() == loc.keys() and r.get("id") == loc.get("id") and r["tokens"] == loc["tokens"]
        assert r["aggregation"] == "mean"
        assert r["reward"] == pytest.approx(loc["reward"], abs=1e-5)  # the in-process engine's reward
        assert list(r["heads"].values()) == pytest.approx(list(loc["heads"].values()), abs=1e-5)

    # A second run finds the job complete: nothing rescored, nothing duplicated.
    before = (tmp_path / "ray.jsonl").read_bytes()
    assert "50 lines resumed" in _score_ray(src, tmp_path / "ray.jsonl", tiny_llama_dir, tmp_path / "store")
    assert (tmp_path / "ray.jsonl").read_bytes() == before


def test_chunk_index_reads_lines_as_the_local_job_does(tmp_path):
    from jobs.ray_job import chunk_index, read_chunk

    src = tmp_path / "x.jsonl"
    src.write_bytes(b"a\nb\r\n\nc\xff\nd")  # CR kept, empty line, bad byte, no final newline
    chunks = chunk_index(src, first_line=2, chunk_size=2)
    assert [(c["start"], c["lines"]) for c in chunks] == [(2, 2), (4, 2)]
    lines = [x for c in chunks for x in read_chunk(src, c["start"], c["offset"], c["lines"])]
    assert lines == [(2, b"b\r\n"), (3, b"\n"), (4, b"c\xff\n"), (5, b"d")]
