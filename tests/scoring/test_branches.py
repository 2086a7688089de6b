"""Per-head branches (issue 17): the served format round-trips through store, loader, engine and kernel,
and head j equals the plain HF model with branch j swapped in (its own forward: the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_store import ModelStore
from model_store.branches import attach_branches, branch_twin, copy_branches, load_branches
from model_store.errors import ModelStoreError
from model_store.loader import load_reward_model
from model_store.manifest import BRANCHES_FILE, MANIFEST_NAME, RewardManifest
from scoring.batching import BatchPolicy
from scoring.engine import Item, ScoringEngine
from tests.builders import build_tiny_bert, build_tiny_llama

TEXTS = [
    "short one",
    "a somewhat longer response that pads the others in its batch",
    "the soup was lovely",
    "x",
    "The staff were rude and the room was cold, but the view made up for much of it.",
]


def _perturb(branches: torch.nn.ModuleList, seed: int) -> None:
    """Branches start as copies of the model's top; give each its own weights so heads differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for br in branches:
            for p in br.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def _branched_dir(src: Path, layers: int, seed: int = 3) -> Path:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(src)
    k = model.config.num_labels
    branches = copy_branches(model, layers, k)
    _perturb(branches, seed)
    attach_branches(src, branches, layers)
    return src


def _twin_logits(model_dir: Path, texts: list[str], j: int, decoder: bool) -> torch.Tensor:
    """Head j from the HF twin (checkpoint with branch j swapped in), one text at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    manifest = RewardManifest.read(model_dir)
    assert manifest is not None and manifest.branches is not None
    branches = load_branches(model, manifest.branches, model_dir, manifest.num_heads)
    twin = branch_twin(model, branches, j)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            if decoder:
                enc.pop("token_type_ids", None)
            out.append(twin(**enc).logits[0, j])
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_each_head_equals_its_branch_twin_through_store_loader_engine_and_kernel(
    tmp_path: Path, kind: str
) -> None:
    if kind == "bert":
        src = build_tiny_bert(tmp_path / "m", k=3, layers=3)
    else:
        src = build_tiny_llama(tmp_path / "m", k=3, layers=3)
    _branched_dir(src, layers=2)
    store = ModelStore(tmp_path / "store")
    store.publish(src, "br", "v1")
    rm = load_reward_model("br:v1", store)
    assert rm.branches is not None and len(rm.branches) == 2
    engine = ScoringEngine(rm, policy=BatchPolicy.resolve("cpu", token_budget=4096, max_batch_size=8))
    scores = engine.score([Item(text=t) for t in TEXTS])  # one padded batch: neighbours of every length
    got = torch.tensor([s.rewards for s in scores])
    for j in range(3):
        ref = _twin_logits(src, TEXTS, j, decoder=kind == "llama")
        torch.testing.assert_close(got[:, j], ref, atol=1e-5, rtol=1e-5)
    # The branches really differ (else the test above could pass with every head on branch 0).
    assert (got[:, 0] - got[:, 1]).abs().max() > 1e-2
    # Summary statistics come from the same fused pass.
    torch.testing.assert_close(torch.tensor([s.min for s in scores]), got.min(1).values, atol=1e-6, rtol=0)
    # Each item alone scores as in the batch (no dependence on neighbours).
    alone = torch.tensor([engine.score([Item(text=t)])[0].rewards for t in TEXTS])
    torch.testing.assert_close(alone, got, atol=1e-5, rtol=1e-5)


def test_manifest_without_branches_is_written_as_before(tmp_path: Path) -> None:
    src = build_tiny_bert(tmp_path / "m", k=3)
    RewardManifest.default_for(3).write(src)
    data = json.loads((src / MANIFEST_NAME).read_text())
    assert "branches" not in data and data["format_version"] == 1
    _branched_dir(src, layers=1)
    data = json.loads((src / MANIFEST_NAME).read_text())
    assert data["branches"] == {"layers": 1, "file": BRANCHES_FILE} and data["format_version"] == 2


def test_branches_need_format_version_2_and_two_heads() -> None:
    with pytest.raises(ValueError, match="format_version 2"):
        RewardManifest.default_for(3, branches={"layers": 1})
    with pytest.raises(ValueError, match="at least 2 heads"):
        RewardManifest.default_for(1, branches={"layers": 1}, format_version=2)


def test_a_broken_or_undeclared_branches_file_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    store = ModelStore(tmp_path / "store")
    src = _branched_dir(build_tiny_bert(tmp_path / "m", k=3), layers=1)
    tensors = load_file(str(src / BRANCHES_FILE))
    dropped = dict(tensors)
    dropped.pop(sorted(dropped)[0])
    save_file(dropped, str(src / BRANCHES_FILE))
    with pytest.raises(ModelStoreError, match="missing"):
        load_reward_model(str(src), store)
    bad = {k: (v.fill_(float("nan")) if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(bad, str(src / BRANCHES_FILE))
    with pytest.raises(ModelStoreError, match="NaN"):
        load_reward_model(str(src), store)
    # A branches file the manifest does not declare would be silently ignored: refused instead.
    plain = build_tiny_bert(tmp_path / "plain", k=3)
    save_file(tensors, str(plain / BRANCHES_FILE))
    with pytest.raises(ModelStoreError, match="declares no branches"):
        load_reward_model(str(plain), store)


def test_branches_must_leave_a_shared_layer(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(build_tiny_bert(tmp_path / "m", layers=2))
    with pytest.raises(ModelStoreError, match="at least one must stay shared"):
        copy_branches(model, 2, 3)


def test_novelty_features_of_a_branched_model_are_the_k_rows_side_by_side(tmp_path: Path) -> None:
    src = _branched_dir(build_tiny_bert(tmp_path / "m", k=3, hidden=32), layers=1)
    rm = load_reward_model(str(src), ModelStore(tmp_path / "store"))
    engine = ScoringEngine(rm)
    phi = engine.pooled_features([engine.encode(Item(text=t)) for t in TEXTS])
    assert phi.shape == (len(TEXTS), 3 * 32)
    # Head j is row j of the folded weight on block j of phi: the rewards follow from phi.
    w, b = engine.heads.weight, engine.heads.bias
    got = torch.tensor([s.rewards for s in engine.score([Item(text=t) for t in TEXTS])])
    torch.testing.assert_close(phi @ w.T + b, got, atol=1e-5, rtol=1e-5)


def test_a_branched_model_is_served_over_http_with_its_branches_on_the_card(tmp_path: Path) -> None:
    import httpx

    from tests.service.conftest import live_server

    src = _branched_dir(build_tiny_bert(tmp_path / "m", k=3, layers=3), layers=2)
    rm = load_reward_model(str(src), ModelStore(tmp_path / "store"))
    engine = ScoringEngine(rm)
    with live_server(engine=engine) as live:
        card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        res = httpx.post(f"{live.url}/v1/score", json={"items": [{"text": t} for t in TEXTS]}).json()
    assert card["branch_layers"] == 2 and card["num_heads"] == 3
    got = torch.tensor([list(r["heads"].values()) for r in res["results"]])
    for j in range(3):
        torch.testing.assert_close(
            got[:, j], _twin_logits(src, TEXTS, j, decoder=False), atol=1e-5, rtol=1e-5
        )
