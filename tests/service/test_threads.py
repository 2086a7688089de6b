"""HYDRA_RM_TORCH_THREADS reaches the threads that run forwards, in `score` and `serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from cli.main import app
from scoring.settings import Settings, apply_torch_threads

ROOT = Path(__file__).resolve().parents[2]

SCORE_AND_REPORT = """
import sys, torch
before = torch.get_num_threads()
from cli.main import app
app(sys.argv[1:], standalone_mode=False)
print(f"THREADS {before} {torch.get_num_threads()}")
"""


def test_score_applies_the_setting_in_its_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A real `hydra-rm score` process: the variable, not torch's default, decides its threads."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "response": "hello there"}) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), HYDRA_RM_TORCH_THREADS="1")
    args = ["-i", str(src), "-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_llama_dir)]
    args += ["--store", str(tmp_path / "store"), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", SCORE_AND_REPORT, "score", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split("THREADS ")[1].split())
    assert after == 1
    if (os.cpu_count() or 1) > 1:
        assert before > 1, "torch's default was already 1: the test would not show the setting applied"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1


def test_serve_forward_thread_uses_the_setting(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Torch keeps the count per thread once a thread has run a parallel op; the batcher's forward
    thread starts after the engine is built, so it must see the value set there."""
    from tests.service.conftest import live_server

    original = torch.get_num_threads()
    want = 1 if original != 1 else 2
    settings = Settings(model=str(tiny_llama_dir), store_root=tmp_path / "store", torch_threads=want)
    try:
        with live_server(settings) as live:
            r = httpx.post(f"{live.url}/get_reward", json={"query": ["hello there"]}, timeout=30)
            assert r.status_code == 200, r.text
            executor = live.service.batcher._executor  # the thread that ran that forward
            assert executor.submit(torch.get_num_threads).result(timeout=10) == want
    finally:
        torch.set_num_threads(original)


def test_explicit_values_and_auto_leaves_torch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` must not undo a count chosen before the engine is built (a Ray actor's CPUs)."""
    original = torch.get_num_threads()
    try:
        monkeypatch.setenv("HYDRA_RM_TORCH_THREADS", "3")
        assert Settings().torch_threads == 3
        assert apply_torch_threads(Settings()) == 3 == torch.get_num_threads()
        monkeypatch.setenv("HYDRA_RM_TORCH_THREADS", "auto")
        assert apply_torch_threads(Settings()) == 3 == torch.get_num_threads()
        monkeypatch.delenv("HYDRA_RM_TORCH_THREADS")
        assert Settings().torch_threads == "auto"
    finally:
        torch.set_num_threads(original)


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", ""])
def test_bad_value_is_a_clear_error(bad: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYDRA_RM_TORCH_THREADS", bad)
    with pytest.raises(ValidationError, match="torch_threads"):
        Settings()
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hi"}) + "\n")
    res = CliRunner().invoke(app, ["score", "-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    assert res.exit_code == 1 and "torch_threads" in res.output, res.output
    res = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert res.exit_code == 1 and "torch_threads" in res.output, res.output
