"""`hydra-default` by name works on a fresh store: the README says the default is published on first use,
and `--base hydra-default` (train) or `--model hydra-default` (serve, score) are uses too. Before, they
failed with "neither in the store ... nor a directory" until something had served the default."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from model_store import ModelStore
from model_store.default_model import DEFAULT_NAME, DEFAULT_VERSION
from model_store.loader import resolve_source


@pytest.mark.parametrize("spec", [DEFAULT_NAME, f"{DEFAULT_NAME}:{DEFAULT_VERSION}"])
def test_the_default_by_name_is_published_on_first_use(tmp_path: Path, spec: str) -> None:
    store = ModelStore(tmp_path / "store")
    path, name, version, from_store = resolve_source(spec, store)
    assert (name, version, from_store) == (DEFAULT_NAME, DEFAULT_VERSION, True)
    assert store.contains(f"{DEFAULT_NAME}:{DEFAULT_VERSION}") and (path / "model.safetensors").exists()


def test_train_with_base_hydra_default_on_a_fresh_store(tmp_path: Path) -> None:
    from cli.main import app
    from training.data import write_pairs
    from training.toydata import preference_rows

    data = write_pairs(tmp_path / "prefs.jsonl", preference_rows(24, seed=1))
    args = ["train", "--data", str(data), "--base", DEFAULT_NAME, "--heads", "2", "--output",
            str(tmp_path / "out"), "--store", str(tmp_path / "store"), "--batch-size", "8", "--max-steps", "1",
            "--cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "neither in the store" not in res.output and "stopped at step 1" in res.output
