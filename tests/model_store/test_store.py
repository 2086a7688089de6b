"""The store publishes atomically, verifies what it loads, and refuses unsafe or escaping inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model_store import (
    ChecksumMismatch,
    InvalidModelName,
    ModelNotFound,
    ModelStore,
    ModelStoreError,
    RewardManifest,
    UnsafeModel,
)
from model_store.loader import load_reward_model
from model_store.manifest import MANIFEST_NAME

REPO = Path(__file__).resolve().parents[2]


def test_publish_list_resolve_latest(store: ModelStore, tiny_llama_dir: Path) -> None:
    a = store.publish(tiny_llama_dir, "rm")
    b = store.publish(tiny_llama_dir, "rm")
    c = store.publish(tiny_llama_dir, "rm", version="v10")
    assert (a.version, b.version, c.version) == ("v1", "v2", "v10")
    assert store.resolve("rm").version == "v10"  # natural order, not lexicographic
    assert store.resolve("rm:v2").path == b.path
    assert [str(r) for r in store.list()] == ["rm:v1", "rm:v2", "rm:v10"]
    manifest = RewardManifest.read(a.path)
    assert manifest is not None and "model.safetensors" in manifest.files
    assert manifest.num_heads == 4
    with pytest.raises(FileExistsError):
        store.publish(tiny_llama_dir, "rm", version="v2")  # versions are immutable
    with pytest.raises(ModelNotFound, match="no version"):
        store.resolve("rm:v9")
    with pytest.raises(ModelNotFound, match="no model named"):
        store.resolve("other")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 200, "a\\b", "/abs", "a..b"])
def test_traversal_and_bad_names_refused(store: ModelStore, tiny_llama_dir: Path, name: str) -> None:
    with pytest.raises(InvalidModelName):
        store.publish(tiny_llama_dir, name)
    with pytest.raises((InvalidModelName, ModelNotFound)):
        store.resolve(name)
    assert not (store.root.parent / "evil").exists()


def test_bad_version_refused(store: ModelStore, tiny_llama_dir: Path) -> None:
    store.publish(tiny_llama_dir, "rm")
    with pytest.raises(InvalidModelName):
        store.publish(tiny_llama_dir, "rm", version="../../x")
    with pytest.raises(InvalidModelName):
        store.resolve("rm:../v1")


def test_checksum_mismatch_refused(store: ModelStore, tiny_llama_dir: Path) -> None:
    ref = store.publish(tiny_llama_dir, "rm")
    weights = ref.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="model.safetensors: sha256 mismatch"):
        load_reward_model("rm", store)


def test_manifest_must_match_config_at_publish(store: ModelStore, tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelStoreError, match="num_labels=4"):
        store.publish(tiny_llama_dir, "rm", manifest=RewardManifest.default_for(2))


def test_unlisted_weight_file_refused(store: ModelStore, tiny_llama_dir: Path) -> None:
    ref = store.publish(tiny_llama_dir, "rm")
    shutil.copy(ref.path / "model.safetensors", ref.path / "extra.safetensors")
    with pytest.raises(ChecksumMismatch, match="not listed"):
        load_reward_model("rm", store)


def test_pickled_weights_refused_unless_allowed(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, src)
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UnsafeModel, match="pickled"):
        store.publish(src, "rm")
    with pytest.raises(UnsafeModel, match="pickled"):
        load_reward_model(str(src), store)
    # explicitly allowed: it publishes, and the safetensors weights are still the ones loaded
    assert store.publish(src, "rm", allow_pickle=True).version == "v1"
    rm = load_reward_model("rm", store, allow_pickle=True)
    assert rm.model.config.num_labels == 4


def test_trainer_artefacts_are_not_weights_and_stay_out(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, src)
    for name in ("training_args.bin", "optimizer.pt", "rng_state.pth"):
        (src / name).write_bytes(b"pickled trainer state")
    ref = store.publish(src, "rm")
    assert not (ref.path / "training_args.bin").exists()
    assert load_reward_model("rm", store).version == "v1"


def test_symlinks_refused(store: ModelStore, tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "linked"
    shutil.copytree(tiny_llama_dir, src)
    (src / "extra.json").symlink_to("/etc/hostname")
    with pytest.raises(UnsafeModel, match="symbolic links"):
        store.publish(src, "rm")
    ref = store.publish(tiny_llama_dir, "rm")
    (ref.path / "sneaky.json").symlink_to("/etc/hostname")
    with pytest.raises(UnsafeModel, match="symbolic links"):
        load_reward_model("rm", store)


def test_published_files_get_umask_modes(store: ModelStore, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """safetensors writes 0600; a version must be readable wherever a normally created file would be
    (a server running as another user than the trainer), and never wider than the umask allows."""
    src = tmp_path / "private"
    shutil.copytree(tiny_llama_dir, src)
    (src / "model.safetensors").chmod(0o600)
    (src / "config.json").chmod(0o700)
    old = os.umask(0o022)
    try:
        ref = store.publish(src, "rm")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ref.path.iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644, modes
    assert ref.path.stat().st_mode & 0o777 == 0o755
    load_reward_model("rm", store)  # checksums still verify


@pytest.mark.parametrize("tamper", ["added_file", "empty_files", "manifest_deleted", "template_changed"])
def test_store_versions_load_only_fully_verified(
    store: ModelStore, tiny_llama_dir: Path, tamper: str
) -> None:
    ref = store.publish(tiny_llama_dir, "rm")
    manifest_path = ref.path / MANIFEST_NAME
    if tamper == "added_file":
        (ref.path / "added_tokens.json").write_text('{"<evil>": 5}')
    elif tamper == "empty_files":
        m = json.loads(manifest_path.read_text())
        m["files"] = {}
        manifest_path.write_text(json.dumps(m))
    elif tamper == "manifest_deleted":
        manifest_path.unlink()
    else:
        (ref.path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.raises(ChecksumMismatch):
        load_reward_model("rm", store)


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "a/../../b", "a\\..\\b", ""])
def test_manifest_file_paths_cannot_escape(key: str) -> None:
    with pytest.raises(ValueError, match="inside the model directory"):
        RewardManifest.default_for(1, files={key: "0" * 64})


def test_concurrent_publish_of_one_version(store: ModelStore, tiny_llama_dir: Path, monkeypatch) -> None:
    """Two publishers race for v1: one wins, the other gets FileExistsError (explicit) or v2 (auto)."""
    import model_store.store as st

    real_fsync = st._fsync_tree
    raced = []

    def racing_fsync(tmp: Path) -> None:
        real_fsync(tmp)
        if not raced:  # while we are between copy and rename, someone else publishes the same version
            raced.append(True)
            ModelStore(store.root).publish(tiny_llama_dir, "rm", version=tmp.name.split("-")[1])

    monkeypatch.setattr(st, "_fsync_tree", racing_fsync)
    with pytest.raises(FileExistsError):
        store.publish(tiny_llama_dir, "rm", version="v1")
    raced.clear()
    assert store.publish(tiny_llama_dir, "rm").version == "v3"  # v2 taken by the racer, so v3
    assert [r.version for r in store.list()] == ["v1", "v2", "v3"]
    assert not [p for p in (store.root / "rm").iterdir() if p.name.startswith(".tmp-")]


def test_remote_code_refused_unless_allowed(store: ModelStore, tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeModel, match="TRUST_REMOTE_CODE"):
        load_reward_model(str(src), store)


def test_single_head_model_without_manifest_loads_as_k1(store: ModelStore, tmp_path: Path) -> None:
    from tests.builders import build_tiny_llama

    src = build_tiny_llama(tmp_path / "k1", k=1)
    (src / MANIFEST_NAME).unlink()
    rm = load_reward_model(str(src), store)
    assert rm.manifest.num_heads == 1 and rm.manifest.head_names == ["head_0"]
    ref = store.publish(src, "public-rm")
    assert RewardManifest.read(ref.path).num_heads == 1


def test_manifest_head_count_must_match_checkpoint(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "wrong"
    shutil.copytree(tiny_llama_dir, src)
    RewardManifest.default_for(3).write(src)
    with pytest.raises(ModelStoreError, match="3 heads"):
        load_reward_model(str(src), store)


def test_manifest_validation() -> None:
    with pytest.raises(ValueError, match="head_names"):
        RewardManifest(num_heads=2, head_names=["a"])
    with pytest.raises(ValueError, match="unknown aggregation"):
        RewardManifest.default_for(2, default_aggregation="median")
    with pytest.raises(ValueError, match="newer"):
        RewardManifest.default_for(2, format_version=99)
    with pytest.raises(ValueError):
        RewardManifest.default_for(2, surprise="field")
    with pytest.raises(ValueError, match="strictly positive"):
        RewardManifest.default_for(2, normalization={"mean": [0, 0], "std": [1, 0]})


def test_unknown_spec_is_a_clear_error(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound, match="neither in the store"):
        load_reward_model("no-such-model", store)


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, shutil
    import model_store.store as st
    root, src, stage, marker = sys.argv[1:5]
    if stage == "copy":
        real = shutil.copy2
        def slow_copy(a, b, **kw):
            out = real(a, b, **kw)
            open(marker, "w").close()
            time.sleep(60)
            return out
        real_tree = shutil.copytree
        shutil.copytree = lambda a, b, **kw: real_tree(a, b, copy_function=slow_copy, **kw)
    else:  # stage == "rename": everything written, about to become visible
        def hang(tmp):
            open(marker, "w").close()
            time.sleep(60)
        st._fsync_tree = hang
    st.ModelStore(root).publish(src, "rm")
    """
)


@pytest.mark.parametrize("stage", ["copy", "rename"])
def test_killed_publish_leaves_old_version_served(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path, stage: str
) -> None:
    old = store.publish(tiny_llama_dir, "rm")
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(store.root), str(tiny_llama_dir), stage, str(marker)],
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "publisher exited before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [str(r) for r in store.list()] == ["rm:v1"]  # nothing half-written is visible
    assert store.resolve("rm").path == old.path
    assert any(p.name.startswith(".tmp-") for p in (store.root / "rm").iterdir())  # the debris is hidden
    assert load_reward_model("rm", store).version == "v1"  # old version still loads and verifies
    assert store.publish(tiny_llama_dir, "rm").version == "v2"  # and publishing still works


def test_publish_verifies_the_sources_own_checksums(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    ref = ModelStore(tmp_path / "origin").publish(tiny_llama_dir, "rm")
    src = tmp_path / "copy"
    shutil.copytree(ref.path, src)
    assert store.publish(src, "rm").version == "v1"  # an intact copy of a version re-publishes
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChecksumMismatch, match="config.json: sha256 mismatch"):
        store.publish(src, "rm")
    assert store.versions("rm") == ["v1"]


def test_a_failed_check_publishes_nothing(store: ModelStore, tiny_llama_dir: Path) -> None:
    seen: list[Path] = []

    def refuse(copy: Path) -> None:
        seen.append(copy)
        assert RewardManifest.read(copy).files  # the check sees the complete copy, checksums written
        raise ModelStoreError("refused by the check")

    with pytest.raises(ModelStoreError, match="refused by the check"):
        store.publish(tiny_llama_dir, "rm", check=refuse)
    assert seen and not seen[0].exists()
    assert not (store.root / "rm").exists()  # not even an empty model directory
    store.publish(tiny_llama_dir, "rm")
    with pytest.raises(ModelStoreError):
        store.publish(tiny_llama_dir, "rm", check=refuse)
    assert [p.name for p in (store.root / "rm").iterdir()] == ["v1"]


def test_bad_version_creates_no_directory(store: ModelStore, tiny_llama_dir: Path) -> None:
    with pytest.raises(InvalidModelName):
        store.publish(tiny_llama_dir, "rm", version="..")
    assert not store.root.exists() or not any(store.root.iterdir())


def test_weight_files_the_model_would_not_load_are_refused(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "stray"
    shutil.copytree(tiny_llama_dir, src)
    shutil.copy(src / "model.safetensors", src / "adapter_model.safetensors")
    with pytest.raises(ModelStoreError, match="would not load"):
        store.publish(src, "rm")
    assert not (store.root / "rm").exists()


def test_sharded_checkpoints_publish_and_a_missing_shard_is_refused(
    store: ModelStore, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    src = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, src)
    (src / "model.safetensors").unlink()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir)
    model.save_pretrained(src, safe_serialization=True, max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1 and (src / "model.safetensors.index.json").exists()
    ref = store.publish(src, "rm")
    assert load_reward_model("rm", store).model.config.num_labels == 4
    assert {p.name for p in shards} <= set(RewardManifest.read(ref.path).files)
    shards[0].unlink()
    with pytest.raises(ModelStoreError, match="shards listed in model.safetensors.index.json are missing"):
        store.publish(src, "rm")
