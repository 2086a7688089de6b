"""`hydra-rm train` through the service CLI's lazy wrapper: a model lands in the store, servable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from model_store import ModelStore
from training.data import write_pairs
from training.overopt import proxy_base, proxy_tokenizer
from training.toydata import preference_rows


def test_train_cli_publishes_a_model(tmp_path: Path):
    data = write_pairs(tmp_path / "prefs.jsonl", preference_rows(120, seed=1))
    base = proxy_base(tmp_path / "base", proxy_tokenizer(), hidden=32, seed=0)
    store = tmp_path / "store"
    args = ["train", "--data", str(data), "--base", str(base), "--heads", "2", "--name", "toy",
            "--head-names", "a,b", "--store", str(store), "--batch-size", "32", "--cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    manifest = ModelStore(store).resolve("toy").path / "reward_heads.json"
    m = json.loads(manifest.read_text())
    assert m["head_names"] == ["a", "b"] and m["normalization"] and m["disagreement"]["n"] == 24
    assert m["provenance"]["data_sha256"] and m["provenance"]["args"]["diversity"] == "shard"
    bad = CliRunner().invoke(app, ["train", "--data", str(data), "--base", str(base), "--store", str(store)])
    assert bad.exit_code == 1 and "--name" in bad.output


def test_serving_cli_does_not_import_training():
    code = "import sys, cli.main; assert not [m for m in sys.modules if m.startswith('training')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_full_ensemble_trains_independent_members_that_eval_scores_together(tmp_path: Path):
    data = write_pairs(tmp_path / "prefs.jsonl", preference_rows(80, seed=4))
    base = proxy_base(tmp_path / "base", proxy_tokenizer(), hidden=32, seed=0)
    store = tmp_path / "store"
    args = ["train", "--data", str(data), "--base", str(base), "--heads", "2", "--name", "ens",
            "--ensemble", "full", "--seed", "5", "--store", str(store), "--cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    members = [
        json.loads((ModelStore(store).resolve(f"ens-m{i}").path / "reward_heads.json").read_text())
        for i in range(2)
    ]
    assert [m["num_heads"] for m in members] == [1, 1]
    assert [m["provenance"]["seed"] for m in members] == [5, 6]
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--model", "ens-m0,ens-m1", "--data", str(data), "--output", str(out),
                                   "--store", str(store)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert list(json.loads(out.read_text())["accuracy_per_head"]) == ["ens-m0/head_0", "ens-m1/head_0"]
