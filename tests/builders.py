"""Tiny, deterministic reward models built locally in well under a second (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from model_store.default_model import build_default_model, corpus_path
from model_store.manifest import RewardManifest


def build_tiny_llama(dest: Path, *, k: int = 4, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A Llama-style decoder with a chat template (reuses the default recipe at a smaller size)."""
    build_default_model(dest, hidden_size=hidden, num_layers=layers, seed=seed)
    if k != 4:
        from transformers import LlamaForSequenceClassification

        model = LlamaForSequenceClassification.from_pretrained(dest)
        model.config.num_labels = k
        model.config.id2label = {i: f"head_{i}" for i in range(k)}
        model.config.label2id = {f"head_{i}": i for i in range(k)}
        torch.manual_seed(seed + 1)
        model.score = torch.nn.Linear(hidden, k, bias=False)
        model.save_pretrained(dest, safe_serialization=True)
        RewardManifest.default_for(k, pooling="last_token").write(dest)
    return dest


def build_tiny_decoder(
    dest: Path,
    arch: str = "qwen2",
    *,
    hidden: int = 32,
    layers: int = 2,
    k: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """A random Qwen2 (RoPE, GQA, biased q/k/v) or GPT-2 (learned absolute positions) reward model
    with the default's tokenizer: the decoder families prefix sharing must keep exact."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    from model_store.default_model import train_tokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus_path().read_text().splitlines())
    common = {
        "vocab_size": len(tok),
        "num_labels": k,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if arch == "gpt2":
        drop = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        config = GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_positions, **drop, **common
        )
        model_cls = GPT2ForSequenceClassification
    elif arch == "qwen2":
        config = Qwen2Config(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
        model_cls = Qwen2ForSequenceClassification
    else:
        raise ValueError(f"unknown arch {arch!r}: qwen2 or gpt2")
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.1)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    RewardManifest.default_for(k, pooling="last_token").write(dest)
    return dest


def build_tiny_bert(dest: Path, *, k: int = 3, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A BERT-like encoder with a pooler and a WordPiece tokenizer (pair template [CLS] a [SEP] b [SEP])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        corpus_path().read_text().splitlines(),
        trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials, show_progress=False),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
        num_labels=k,
        pad_token_id=fast.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(dest, safe_serialization=True)
    fast.save_pretrained(dest)
    return dest
