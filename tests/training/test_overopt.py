"""The over-optimisation experiment: the exact best-of-n estimator and a tiny end-to-end run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from training.overopt import Setup, aggregate, best_of_n, kl_bon, run_experiment
from training.overopt_report import write_results


def test_best_of_n_equals_enumeration_over_subsets():
    g = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    for n in (1, 2, 3, 7):
        want = 0.0
        for p in range(3):
            subsets = list(itertools.combinations(range(7), n))
            want += sum(gold[p, max(s, key=lambda i: proxy[p, i])].item() for s in subsets) / len(subsets)
        assert best_of_n(proxy, gold, [n])[0] == pytest.approx(want / 3, abs=1e-9)
    assert kl_bon(1) == 0.0 and kl_bon(4096) == pytest.approx(math.log(4096) - 4095 / 4096)


def test_aggregations():
    r = torch.tensor([[1.0, 3.0]])
    assert aggregate(r, "min").item() == 1.0 and aggregate(r, "mean").item() == 2.0
    assert aggregate(r, "uwo").item() == pytest.approx(2.0 - 0.5 * 1.0)


def test_tiny_experiment_end_to_end(tmp_path: Path):
    setup = Setup(seeds=[0, 1], pool_size=16, n_pairs=120, epochs=1, n_prompts=4, hidden=32)
    results = run_experiment(setup, tmp_path, log=lambda _msg: None)
    assert results["ns"] == [1, 2, 4, 8, 16]
    curves = results["per_seed"]["0"]
    assert {"single", "k3-joint/min", "k3-shard/uwo", "k3-bootstrap/mean", "full-ensemble/min"} <= set(curves)
    for c in curves.values():  # n=1 is the pool's mean gold whatever the proxy
        assert c[0] == pytest.approx(results["gold_mean_pool"], abs=1e-6)
    md, png, js = write_results(results, tmp_path, prefix="t")
    text = md.read_text()
    assert "| k3-shard/min |" in text and "share of full-min gain" in text and png.stat().st_size > 1000
