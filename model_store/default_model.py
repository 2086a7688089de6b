"""The embedded default model: a small trained K=4 reward model that ships in the repo (~1.8 MB).

A Llama-style decoder (hidden 128, 2 layers) with a byte-level BPE tokenizer and a chat template, so
`hydra-rm serve` works on a fresh machine with no network. Its four heads are review-sentiment reward
heads: each was trained by `training/` with the disjoint-shard recipe on its own quarter of 4,000
offline review pairs labelled by VADER (10% of labels flipped), on one shared trunk; the disagreement
between them is real model uncertainty. Held-out accuracy is in the README and in the manifest's
provenance. Rebuild (deterministic recipe, training on CPU in a few minutes):
`python -m training.default_build` (writes `model_store/data/default_model/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from model_store.errors import ModelNotFound
from model_store.manifest import RewardManifest
from model_store.store import ModelRef, ModelStore

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_NAME = "hydra-default"
# Bump when the recipe below changes, so a store never serves a stale build under a new recipe.
DEFAULT_VERSION = "3"
HEAD_NAMES = ["review_sentiment_1", "review_sentiment_2", "review_sentiment_3", "review_sentiment_4"]
# The untrained architecture builder (tests' tiny decoders) keeps its historical, meaningless names.
UNTRAINED_HEAD_NAMES = ["helpful", "harmless", "honest", "concise"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus_path() -> Path:
    return Path(__file__).parent / "data" / "corpus.txt"


def shipped_default_dir() -> Path:
    return Path(__file__).parent / "data" / "default_model"


def train_tokenizer(
    texts: list[str], vocab_size: int = 1024, chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every string is encodable) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_default_model(
    dest: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
    extra_texts: list[str] | None = None,
    head_names: list[str] | None = None,
) -> Path:
    """Write the untrained architecture (safetensors + tokenizer + manifest) into `dest`: random seeded
    heads. Tests and benches use it as a tiny decoder; `training.default_build` trains it into the
    shipped default."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    texts = corpus_path().read_text().splitlines() + list(extra_texts or [])
    tokenizer = train_tokenizer(texts)
    names = head_names or UNTRAINED_HEAD_NAMES
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # heads with a visible spread, so disagreement is non-trivial
        model.score.weight.normal_(0.0, 0.1)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    RewardManifest(
        num_heads=len(names),
        head_names=names,
        pooling="last_token",
        max_length=512,
        description="hydra-rm embedded default (random seeded heads; replace with a trained model)",
    ).write(dest)
    return dest


def ensure_default_model(store: ModelStore) -> ModelRef:
    """Return the default from the store, publishing the shipped trained checkpoint on first use."""
    spec = f"{DEFAULT_NAME}:{DEFAULT_VERSION}"
    if store.contains(spec):
        return store.resolve(spec)
    src = shipped_default_dir()
    if not (src / "model.safetensors").exists():
        raise ModelNotFound(
            f"the embedded default model is missing from {src}; rebuild it with `python -m training.default_build`"
        )
    try:
        return store.publish(src, DEFAULT_NAME, DEFAULT_VERSION)
    except FileExistsError:  # another process published it concurrently: the same shipped files
        return store.resolve(spec)
