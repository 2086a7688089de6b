"""`hydra-rm train` writes the novelty statistic; `hydra-rm calibrate` adds it to any model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from model_store import ModelStore, RewardManifest
from model_store.loader import load_reward_model
from model_store.novelty import DEFAULT_LAMBDA, NOVELTY_FILE
from model_store.uncertainty import fit_quantiles
from scoring.batching import BatchPolicy
from scoring.engine import Item, ScoringEngine
from training.calibrate import split_items
from training.data import load_pairs, write_pairs
from training.overopt import proxy_base, proxy_tokenizer
from training.toydata import preference_rows
from training.trainer import split_reference


def test_train_writes_it_and_calibrate_republishes(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "prefs.jsonl", preference_rows(120, seed=3))
    base = proxy_base(tmp_path / "base", proxy_tokenizer(), hidden=32, seed=0)
    store = tmp_path / "store"
    args = ["train", "--data", str(data), "--base", str(base), "--heads", "2", "--name", "toy",
            "--store", str(store), "--batch-size", "32", "--cpu"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    path = ModelStore(store).resolve("toy").path
    m = RewardManifest.read(path)
    assert m is not None and m.novelty is not None and NOVELTY_FILE in m.files
    assert m.novelty.n == 2 * 108 and m.novelty.quantiles.n == 2 * 12  # train responses; reference split
    # Served u on the reference items reproduces the stored quantiles (same features, same basis).
    pairs = load_pairs(data)
    _, ref_idx = split_reference(len(pairs), 0.1, 0)
    ref = [Item(**it) for i in ref_idx for it in (pairs[i].chosen, pairs[i].rejected)]
    assert len(ref) == 24
    rm = load_reward_model("toy", ModelStore(store))
    engine = ScoringEngine(rm, policy=BatchPolicy.resolve("cpu", token_budget=4096, max_batch_size=64))
    u = [s.novelty for s in engine.score(ref)]
    refit = fit_quantiles(u, m.novelty.quantiles.probs)
    torch.testing.assert_close(
        torch.tensor(refit.values), torch.tensor(m.novelty.quantiles.values), rtol=1e-4, atol=1e-6
    )

    res = CliRunner().invoke(app, ["calibrate", "--model", "toy", "--data", str(data), "--store", str(store), "--lambda", "0.3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["published"] == "toy:v2" and out["fit_rows"] == 192 and out["quantile_rows"] == 48
    assert RewardManifest.read(ModelStore(store).resolve("toy:v2").path).novelty.lam == 0.3  # type: ignore[union-attr]
    assert RewardManifest.read(path).novelty.lam == DEFAULT_LAMBDA  # type: ignore[union-attr]  # v1 untouched


def test_calibrate_cli_on_a_plain_hf_directory(tiny_bert_dir: Path, tmp_path: Path) -> None:
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} about {w}"}) + "\n"
                             for i, w in enumerate(["soup", "rain", "cats", "tea", "books"] * 6)))  # fmt: skip
    store = tmp_path / "store"
    no_name = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_bert_dir), "--data", str(texts), "--store", str(store)])  # fmt: skip
    assert no_name.exit_code == 1 and "--name" in no_name.output
    res = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_bert_dir), "--data", str(texts), "--name", "bert", "--store", str(store)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["lambda"] == DEFAULT_LAMBDA  # no --lambda: the library default
    rm = load_reward_model("bert", ModelStore(store))
    assert (
        rm.novelty is not None and rm.manifest.novelty is not None and rm.manifest.novelty.feature == "pooler"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nonsense": 1}\n')
    res = CliRunner().invoke(app, ["calibrate", "--model", "bert", "--data", str(bad), "--store", str(store)])
    assert res.exit_code == 1 and "bad.jsonl:2" in res.output


def test_split_is_seeded_and_keeps_both_sides() -> None:
    items = [Item(text=str(i)) for i in range(10)]
    a, b = split_items(items, 0.2, 0)
    assert len(a) == 8 and len(b) == 2 and split_items(items, 0.2, 0) == (a, b)
    assert split_items(items, 0.2, 1) != (a, b)
    with pytest.raises(ValueError, match="at least 2"):
        split_items(items[:1], 0.2, 0)
