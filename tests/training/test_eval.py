"""`hydra-rm eval` metrics against hand-computed values, and the command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from training.data import write_pairs
from training.evaluate import auroc, metrics, reliability
from training.overopt import proxy_base, proxy_tokenizer
from training.toydata import preference_rows

C = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
R = torch.tensor([[0.0, 1.0], [1.0, -1.0], [0.0, 0.0]])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_metrics_equal_hand_computed_values():
    m = metrics(C, R, ["a", "b"], lam=0.5)
    # margins a: [1, -1, 3], b: [1, 1, -1]
    assert m["accuracy_per_head"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3)}
    # min: [1,0,-1]-[0,-1,0]; mean: [1.5,0,1]-[.5,0,0] (a tie counts half); max: [2,0,3]-[1,1,0];
    # uwo: mean - 0.5 var: [1.375,0,-1]-[.375,-.5,0]
    assert m["accuracy"] == pytest.approx({"min": 2 / 3, "mean": 2.5 / 3, "max": 2 / 3, "uwo": 2 / 3})
    # head a: confidences sig(1), sig(1), sig(3) with correctness 1, 0, 1 -> bins [0.7,0.8) and [0.9,1.0]
    ece_a = 2 / 3 * abs(0.5 - sig(1)) + 1 / 3 * abs(1 - sig(3))
    assert m["ece_per_head"]["a"] == pytest.approx(ece_a)
    # disagreement per pair = mean of the two items' head stds: [0.5, 0.5, 1.0]; misranked by mean: pair 1
    assert m["disagreement_auroc_misranked"] == pytest.approx(0.25)
    z = torch.cat([C, R]).numpy()
    assert m["head_correlation"] == pytest.approx(float(np.corrcoef(z.T)[0, 1]))
    # per-head probabilities aggregated by min over heads: [sig(1), sig(-1), sig(-1)]: one bin,
    # confidence sig(1) each, right once in three
    rel = m["reliability"]["min"]
    assert rel["ece"] == pytest.approx(abs(1 / 3 - sig(1)))
    assert [b["count"] for b in rel["bins"]] == [0, 0, 3, 0, 0]


def test_reliability_bins_and_auroc_edges():
    ece, rows = reliability(torch.tensor([0.5, 1.0, 0.0]))
    assert [r["count"] for r in rows] == [1, 0, 0, 0, 2]  # 1.0 lands in the closed last bin
    assert ece == pytest.approx(2 / 3 * abs(0.5 - 1.0))  # p=0 is a confident wrong ranking
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None
    assert auroc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([True, False, False])) == 1.0


def test_eval_command_end_to_end(tmp_path: Path):
    data = write_pairs(tmp_path / "train.jsonl", preference_rows(160, seed=2))
    test = write_pairs(tmp_path / "test.jsonl", preference_rows(60, seed=9))
    base = proxy_base(tmp_path / "base", proxy_tokenizer(), hidden=32, seed=0)
    store = tmp_path / "store"
    common = ["--store", str(store)]
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--base",
            str(base),
            "--name",
            "m",
            "--cpu",
            "--batch-size",
            "32",
            *common,
        ],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "report" / "report.json"
    res = CliRunner().invoke(
        app, ["eval", "--model", "m", "--data", str(test), "--output", str(out), *common]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["pairs"] == 60 and set(report["accuracy"]) == {"min", "mean", "max", "uwo"}
    assert (out.parent / report["reliability_png"]).stat().st_size > 1000
    assert "disagreement AUROC" in res.output and report["throughput_items_per_s"] > 0
    from model_store import ModelStore
    from training.data import load_pairs
    from training.scoring import EngineScorer

    pairs = load_pairs(test)
    r = EngineScorer("m", ModelStore(store)).score([p.chosen for p in pairs] + [p.rejected for p in pairs])
    assert report["accuracy_per_head"]["head_0"] == pytest.approx(
        float((r[:60, 0] > r[60:, 0]).double().mean())
    )
