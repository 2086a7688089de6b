"""Checkpoints whose parts do not fit together: refused on import (one line, nothing published) and at
serve time, and a K-label checkpoint without a manifest resolved the same way by import and serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_store import ModelStore, ModelStoreError
from model_store.loader import load_reward_model
from model_store.manifest import MANIFEST_NAME
from tests.cli.test_import_check import _import, _store_is_empty


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


def test_weights_the_config_does_not_use_are_refused(plain_copy: Path, tmp_path: Path) -> None:
    """config.json says 1 layer while the weights hold 2: the second layer was silently dropped and
    rewards moved by up to 3.9, with sign flips."""
    config = json.loads((plain_copy / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    config["num_hidden_layers"] = 1
    (plain_copy / "config.json").write_text(json.dumps(config))
    (plain_copy / MANIFEST_NAME).unlink(missing_ok=False)  # no checksums either
    root = tmp_path / "store"
    cause = _one_line_refusal(*_import(plain_copy, root))
    assert "not used by its config" in cause and "model.layers.1." in cause
    assert _store_is_empty(root)
    with pytest.raises(ModelStoreError, match="not used by its config"):
        load_reward_model(str(plain_copy), ModelStore(tmp_path / "other"))


def test_an_extra_tensor_is_refused(plain_copy: Path, tmp_path: Path) -> None:
    weights = load_file(plain_copy / "model.safetensors")
    weights["surplus.weight"] = torch.zeros(3)
    save_file(weights, plain_copy / "model.safetensors", metadata={"format": "pt"})
    cause = _one_line_refusal(*_import(plain_copy, tmp_path / "store"))
    assert "surplus.weight" in cause


def test_a_two_label_checkpoint_without_a_manifest_imports_and_serves_as_k_2(tmp_path: Path) -> None:
    """`num_labels=2` is transformers' default, so config.json does not record it: import took the
    missing key for K=1 and refused ("manifest says 1 heads but the checkpoint has num_labels=2")
    while `serve --model DIR` inferred K=2."""
    from tests.builders import build_tiny_decoder

    src = build_tiny_decoder(tmp_path / "two", k=2)
    (src / MANIFEST_NAME).unlink()
    config = json.loads((src / "config.json").read_text())
    config.pop("num_labels", None)
    config.pop("id2label", None)  # what transformers writes (or older versions wrote) for the default 2
    config.pop("label2id", None)
    (src / "config.json").write_text(json.dumps(config))
    root = tmp_path / "store"
    code, out = _import(src, root)
    assert code == 0, out
    store = ModelStore(root)
    served = load_reward_model(str(src), store).manifest
    imported = load_reward_model("rm", store).manifest
    assert imported.num_heads == served.num_heads == 2
    assert imported.head_names == served.head_names
    assert imported.max_length == served.max_length


@pytest.mark.parametrize(
    "labels",
    [{}, {"num_labels": 5}, {"id2label": {"0": "a", "1": "b", "2": "c"}}, {"num_labels": 1}],
    ids=["absent", "num_labels", "id2label", "one"],
)
def test_the_store_reads_k_from_config_json_as_transformers_does(tmp_path: Path, labels: dict) -> None:
    from transformers import AutoConfig

    from model_store.manifest import config_num_labels

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **labels}))
    assert config_num_labels(tmp_path) == AutoConfig.from_pretrained(tmp_path).num_labels
