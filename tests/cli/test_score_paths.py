"""`hydra-rm score` with paths it cannot use: one line naming the path and the cause, rc 1, no traceback
(an unwritable output printed a Python traceback; an input that is a directory "did not exist")."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app


def _score(tiny_llama_dir: Path, tmp_path: Path, input_: Path, output: Path) -> tuple[int, str]:
    res = CliRunner().invoke(
        app,
        ["score", "-i", str(input_), "-o", str(output), "--model", str(tiny_llama_dir)]
        + ["--store", str(tmp_path / "store"), "--no-progress"],
    )
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, res.output


@pytest.fixture()
def lines(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "hello"}\n{"text": "world"}\n')
    return path


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("missing/out.jsonl", "does not exist"),
        ("a_directory", "is a directory"),
        ("/proc/hydra-out.jsonl", "cannot write"),
    ],
    ids=["missing-parent", "directory", "proc"],
)
def test_an_unwritable_output_is_one_line_and_rc_1(
    tiny_llama_dir: Path, tmp_path: Path, lines: Path, where: str, cause: str
) -> None:
    (tmp_path / "a_directory").mkdir()
    output = Path(where) if where.startswith("/") else tmp_path / where
    code, out = _score(tiny_llama_dir, tmp_path, lines, output)
    assert code == 1, out
    assert "Traceback" not in out
    text = [line for line in out.splitlines() if line.strip()]
    assert len(text) == 1 and text[0].startswith("error: ") and cause in text[0], out
    assert str(output) in text[0]


def test_an_input_that_is_a_directory_is_reported_as_one(tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, out = _score(tiny_llama_dir, tmp_path, tmp_path, tmp_path / "out.jsonl")
    assert code == 1
    assert "is a directory" in out and "does not exist" not in out, out
