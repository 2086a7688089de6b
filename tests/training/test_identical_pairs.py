"""Pairs whose chosen and rejected sides are the same text carry no preference: `hydra-rm train` on a
file of only such pairs published a model (rc 0, loss ln 2, reference accuracy 0.0)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from training.data import write_pairs
from training.overopt import proxy_base, proxy_tokenizer
from training.toydata import preference_rows


def _train(tmp_path: Path, rows: list[dict]) -> tuple[int, str]:
    data = write_pairs(tmp_path / "prefs.jsonl", rows)
    base = proxy_base(tmp_path / "base", proxy_tokenizer(), hidden=32, seed=0)
    args = ["train", "--data", str(data), "--base", str(base), "--heads", "2", "--name", "toy",
            "--store", str(tmp_path / "store"), "--batch-size", "32", "--cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output


def test_pairs_without_signal_on_every_line_are_refused_naming_the_lines(tmp_path: Path) -> None:
    rows = [{**r, "rejected": r["chosen"]} for r in preference_rows(40, seed=1)]
    code, out = _train(tmp_path, rows)
    assert code == 1, out
    assert "chosen == rejected" in out and "all 40 pairs" in out and "lines 1, 2, 3" in out
    assert not (tmp_path / "store" / "toy").exists()


def test_a_share_of_identical_pairs_is_warned_about_and_trains(tmp_path: Path) -> None:
    rows = preference_rows(60, seed=1)
    for i in (4, 9, 14, 19, 24, 29, 34, 39, 44, 49):  # lines 5, 10, ..., 50: 10 of 60
        rows[i] = {**rows[i], "rejected": rows[i]["chosen"]}
    code, out = _train(tmp_path, rows)
    assert code == 0, out
    assert "WARNING" in out and "10 of 60 pairs" in out and "lines 5, 10, 15" in out
    assert "published toy:v1" in out
