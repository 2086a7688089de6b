"""Checkpoints whose parts do not fit together: refused on import (one line, nothing published) and at
serve time, and a K-label checkpoint without a manifest resolved the same way by import and serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_store import ModelStore, ModelStoreError
from model_store.loader import load_reward_model
from tests.service.test_import_check import _import, _store_is_empty


@pytest.fixture()
def plain_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "plain"
    shutil.copytree(tiny_llama_dir, dest)
    return dest


def _one_line_refusal(code: int, out: str) -> str:
    assert code == 1, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1].endswith("refused: nothing was published"), out
    assert len(lines) == 2, out  # the cause, then the verdict
    return lines[0]


def test_tokenizer_ids_past_the_embedding_are_refused_naming_the_cause(
    plain_copy: Path, tmp_path: Path
) -> None:
    """The embedding cut below the tokenizer's vocabulary: `IndexError: index out of range in self`
    came out as a Rich traceback."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(plain_copy))
    model = AutoModelForSequenceClassification.from_pretrained(plain_copy)
    model.resize_token_embeddings(vocab - 40)
    model.save_pretrained(plain_copy, safe_serialization=True)
    root = tmp_path / "store"
    cause = _one_line_refusal(*_import(plain_copy, root))
    assert f"tokenizer has {vocab} tokens" in cause and f"embedding has {vocab - 40} rows" in cause
    assert _store_is_empty(root)
    with pytest.raises(ModelStoreError, match="embedding has"):  # serve refuses it the same way
        load_reward_model(str(plain_copy), ModelStore(tmp_path / "other"))
