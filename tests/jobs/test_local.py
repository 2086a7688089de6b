"""Batch scoring: ordered, resumable without duplicates, and every bad line accounted for."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.local import JobError, ScoreJob
from model_store.aggregation import Aggregation
from scoring.engine import Item, ScoringEngine

REPO = Path(__file__).resolve().parents[2]
WORDS = "a helpful answer explains each step while a harmful one is rude or wrong".split()


def _write_input(path: Path, n: int, seed: int = 0, bad_every: int = 0) -> dict[int, str]:
    """Writes n lines; every `bad_every`-th line is malformed. Returns {line number: kind of badness}."""
    rng = random.Random(seed)
    bad: dict[int, str] = {}
    kinds = ["not json at all", "[1, 2, 3]", '{"prompt": "only a prompt"}', "", '{"text": 5}']
    with open(path, "w") as f:
        for i in range(1, n + 1):
            if bad_every and i % bad_every == 0:
                line = kinds[(i // bad_every) % len(kinds)]
                bad[i] = line
            else:
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
                line = json.dumps({"id": f"item-{i}", "prompt": prompt, "response": response})
            f.write(line + "\n")
    return bad


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_many_chunks_in_order_with_errors_file(tiny_engine: ScoringEngine, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = _write_input(src, 1_200, bad_every=97)  # 12 chunks, every kind of bad line
    result = ScoreJob(tiny_engine, src, out, chunk_size=100).run(progress_bar=False)
    assert (result.lines, result.scored, result.errors) == (1_200, 1_200 - len(bad), len(bad))
    rows = _lines(out)
    assert [r["line"] for r in rows] == [i for i in range(1, 1_201) if i not in bad]  # order kept
    assert all(r["id"] == f"item-{r['line']}" for r in rows)
    errors = _lines(tmp_path / "out.errors.jsonl")
    assert [e["line"] for e in errors] == sorted(bad)
    assert all(e["error"] and e["field"] for e in errors)
    assert {e["field"] for e in errors} >= {"line", "response", "text"}
    # spot-check the scores against the engine scoring each item alone
    inputs = src.read_text().splitlines()
    for r in random.Random(1).sample(rows, 20):
        src_obj = json.loads(inputs[r["line"] - 1])
        alone = tiny_engine.score([Item(prompt=src_obj["prompt"], response=src_obj["response"])])[0]
        assert list(r["heads"].values()) == pytest.approx(alone.rewards, abs=1e-5)
        assert r["reward"] == pytest.approx(min(alone.rewards), abs=1e-5)
        assert set(r) >= {"min", "max", "mean", "std", "tokens", "truncated", "aggregation"}


def test_killed_and_resumed_equals_uninterrupted(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run (a real process), then resume: byte for byte the output of an uninterrupted run."""
    from typer.testing import CliRunner

    from cli.main import app

    src = tmp_path / "in.jsonl"
    _write_input(src, 600, seed=3, bad_every=101)
    out, ref_out = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    progress = tmp_path / "out.jsonl.progress.json"
    store = str(tmp_path / "store")

    def args(output: Path) -> list[str]:
        return ["score", "--input", str(src), "--output", str(output), "--model", str(tiny_llama_dir),
                "--chunk-size", "25", "--no-progress", "--store", store]  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as this process (conftest)
    code = "import time; import jobs.local as j; f = j.ScoreJob.score_chunk\n"
    code += "j.ScoreJob.score_chunk = lambda *a: (time.sleep(0.01), f(*a))[1]\n"  # never done before the kill
    code += "from cli.main import app; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        if progress.exists() and json.loads(progress.read_text())["lines_done"] >= 100:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    state = json.loads(progress.read_text())
    assert not state["complete"] and state["lines_done"] < 600
    with open(out, "ab") as f:  # a crash mid-chunk leaves a torn line behind the checkpoint
        f.write(b'{"id": "item-torn", "rew')

    ref = CliRunner().invoke(app, args(ref_out))  # the uninterrupted run, in this process
    assert ref.exit_code == 0, ref.output
    resumed = CliRunner().invoke(app, args(out))
    assert resumed.exit_code == 0, resumed.output
    import re

    resumed_lines = int(re.search(r"(\d+) lines resumed", resumed.output).group(1))
    assert resumed_lines == state["lines_done"] >= 100  # finished chunks were not scored again
    assert out.read_text() == ref_out.read_text()  # same lines, same order, no duplicates, no torn line
    assert (tmp_path / "out.errors.jsonl").read_text() == (tmp_path / "ref.errors.jsonl").read_text()


def test_complete_job_is_not_rescored_and_other_jobs_are_refused(
    tiny_engine: ScoringEngine, tmp_path: Path
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 30)
    ScoreJob(tiny_engine, src, out).run(progress_bar=False)
    again = ScoreJob(tiny_engine, src, out).run(progress_bar=False)
    assert again.scored == 0 and again.skipped == 30
    with pytest.raises(JobError, match="different job"):
        ScoreJob(tiny_engine, src, out, aggregation=Aggregation.parse("mean", 4)).run(progress_bar=False)
    other = tmp_path / "other.jsonl"
    other.write_text('{"precious": "data"}\n')
    with pytest.raises(JobError, match="--restart"):
        ScoreJob(tiny_engine, src, other).run(progress_bar=False)
    assert other.read_text() == '{"precious": "data"}\n'  # never clobbered
    assert ScoreJob(tiny_engine, src, other).run(restart=True, progress_bar=False).scored == 30


def test_poison_item_is_isolated(tiny_engine: ScoringEngine, tmp_path: Path, monkeypatch) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 40)
    poison_len = json.loads(src.read_text().splitlines()[7])  # line 8
    poison_tokens = tiny_engine.encode(
        Item(prompt=poison_len["prompt"], response=poison_len["response"])
    ).input_ids
    real_forward = tiny_engine.forward

    def forward(batch):
        if any(e.input_ids == poison_tokens for e in batch):
            raise RuntimeError("simulated kernel fault")
        return real_forward(batch)

    monkeypatch.setattr(tiny_engine, "forward", forward)
    result = ScoreJob(tiny_engine, src, out, chunk_size=16).run(progress_bar=False)
    assert result.errors == 1 and result.scored == 39
    [err] = _lines(tmp_path / "out.errors.jsonl")
    assert err["line"] == 8 and "simulated kernel fault" in err["error"]


def test_cli_score_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        json.dumps({"id": 1, "text": "hello"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        )
        + "\n{broken\n"
    )
    args = [
        "score",
        "-i",
        str(src),
        "-o",
        str(out),
        "--model",
        str(tiny_llama_dir),
        "--aggregation",
        "head:1",
    ]
    res = CliRunner().invoke(app, [*args, "--store", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = _lines(out)
    assert [r.get("id") for r in rows] == [1, None]
    assert all(r["reward"] == list(r["heads"].values())[1] for r in rows)
    assert _lines(tmp_path / "out.errors.jsonl")[0]["line"] == 3
    bad = CliRunner().invoke(app, ["score", "-i", str(src), "-o", str(tmp_path / "x.jsonl"), "--model",
                                   str(tiny_llama_dir), "--aggregation", "head:9", "--store", str(tmp_path / "s")])  # fmt: skip
    assert bad.exit_code == 1 and "head index" in bad.output


def test_refuses_to_clobber_or_alias_files(tiny_engine: ScoringEngine, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 5)
    stray = tmp_path / "out.errors.jsonl"
    stray.write_text("someone else's errors\n")
    with pytest.raises(JobError, match="not from this job"):
        ScoreJob(tiny_engine, src, out).run(progress_bar=False)
    assert stray.read_text() == "someone else's errors\n"
    with pytest.raises(JobError, match="different files"):
        ScoreJob(tiny_engine, src, tmp_path / "x.jsonl", errors_path=src)
    with pytest.raises(JobError, match="different files"):
        ScoreJob(tiny_engine, src, src)
    assert len(src.read_text().splitlines()) == 5


def test_restart_then_crash_then_resume_is_clean(
    tiny_engine: ScoringEngine, tmp_path: Path, monkeypatch
) -> None:
    """--restart records fresh progress before writing, so a crash right after it resumes from zero."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 40)
    ScoreJob(tiny_engine, src, out, chunk_size=10).run(progress_bar=False)
    reference = out.read_text()

    def crash(*a, **k):
        raise KeyboardInterrupt

    job = ScoreJob(tiny_engine, src, out, chunk_size=10)
    monkeypatch.setattr(job, "score_chunk", crash)
    with pytest.raises(KeyboardInterrupt):
        job.run(restart=True, progress_bar=False)
    assert out.read_text() == ""
    monkeypatch.undo()
    resumed = ScoreJob(tiny_engine, src, out, chunk_size=10).run(progress_bar=False)
    assert resumed.skipped == 0 and out.read_text() == reference
    out.write_text(reference[:100])  # someone truncated the finished output
    progress = tmp_path / "out.jsonl.progress.json"
    state = json.loads(progress.read_text())
    state["complete"] = False
    progress.write_text(json.dumps(state))
    with pytest.raises(JobError, match="shorter than at its last checkpoint"):
        ScoreJob(tiny_engine, src, out, chunk_size=10).run(progress_bar=False)


def test_bytes_crlf_bom_and_unicode(tiny_engine: ScoringEngine, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"id": 1, "text": "BOM first line"}).encode() + b"\r\n"
        + json.dumps({"id": 2, "text": "caf\u00e9 \u2014 \U0001f600"}, ensure_ascii=False).encode() + b"\n"
        + b'{"id": 3, "text": "bad \xff byte"}\n'
        + b'{"id": 4, "text": "raw \r is invalid JSON, but must not split the line"}\n'
        + json.dumps({"id": 5, "text": "lone surrogate \ud800"}).encode() + b"\n"
        + json.dumps({"id": 6, "text": "no trailing newline"}).encode()
    )  # fmt: skip
    result = ScoreJob(tiny_engine, src, out).run(progress_bar=False)
    assert result.lines == 6
    rows = _lines(out)
    assert [(r["id"], r["line"]) for r in rows] == [(1, 1), (2, 2), (6, 6)]  # line numbers match the file
    errors = {e["line"]: e for e in _lines(tmp_path / "out.errors.jsonl")}
    assert set(errors) == {3, 4, 5}
    assert "UTF-8" in errors[3]["error"] and "\\xff" in errors[3]["raw"]
    assert errors[5]["field"] == "text"


def test_non_finite_rewards_go_to_errors(tiny_engine: ScoringEngine, tmp_path: Path, monkeypatch) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(src, 6)
    real_forward = tiny_engine.forward

    def forward(batch):
        scores = real_forward(batch)
        for s in scores:
            if s.tokens % 2:
                s.rewards[0] = float("nan")
        return scores

    monkeypatch.setattr(tiny_engine, "forward", forward)
    result = ScoreJob(tiny_engine, src, out).run(progress_bar=False)
    assert result.scored + result.errors == 6 and result.errors > 0
    assert all(json.loads(x) for x in out.read_text().splitlines())  # strict JSON: no NaN tokens
    assert "NaN" not in out.read_text()
    assert all("non-finite" in e["error"] for e in _lines(tmp_path / "out.errors.jsonl"))


def test_memory_does_not_grow_with_file_size(tiny_engine: ScoringEngine, tmp_path: Path, monkeypatch) -> None:
    """Python-heap peak while scoring 4x more lines stays flat: the job streams chunk by chunk.

    The model is not the point here (and tracemalloc around torch is slow): the forward is a fake
    that returns one score per item; tokenizing, planning, writing and checkpointing are real."""
    import tracemalloc

    from scoring.results import ItemScore

    def forward(batch):
        return [ItemScore([0.1, 0.2, 0.3, 0.4], 0.1, 0.4, 0.25, 0.1, e.n_tokens, e.truncated) for e in batch]

    monkeypatch.setattr(tiny_engine, "forward", forward)
    peaks = []
    for n in (500, 2000):
        src, out = tmp_path / f"in{n}.jsonl", tmp_path / f"out{n}.jsonl"
        _write_input(src, n, seed=n)
        tracemalloc.start()
        ScoreJob(tiny_engine, src, out, chunk_size=100).run(progress_bar=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(out.read_text().splitlines()) == n
    assert peaks[1] < 1.5 * peaks[0], peaks
