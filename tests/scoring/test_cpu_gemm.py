"""oneDNN-prepacked linears (scoring/cpu_gemm.py): equal to aten where used, never used where stale."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from model_store import ModelStore
from model_store.loader import load_reward_model
from scoring.batching import BatchPolicy
from scoring.cpu_gemm import available, is_packed, pack_linears, unpack_linears
from scoring.engine import Item, ScoringEngine
from scoring.settings import Settings

pytestmark = pytest.mark.skipif(not available(), reason="torch built without oneDNN (mkldnn)")


@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (3, 33, 48), (2050, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_aten(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert pack_linears(lin) == 1
    with torch.inference_mode():
        got = lin(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_stale_or_trained_weights_fall_back_to_aten() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(16, 8)
    pack_linears(lin)
    x = torch.randn(4, 16, requires_grad=True)
    lin(x).sum().backward()  # autograd: aten, gradients flow to the Parameter
    assert lin.weight.grad is not None and x.grad is not None
    torch.optim.SGD(lin.parameters(), lr=1.0).step()  # in place: the packed copy is now stale
    with torch.inference_mode():
        assert torch.equal(lin(x.detach()), torch.nn.functional.linear(x.detach(), lin.weight, lin.bias))
    lin.weight = nn.Parameter(torch.randn(8, 16))  # replaced, version counter back at 0
    with torch.inference_mode():
        assert torch.equal(lin(x.detach()), torch.nn.functional.linear(x.detach(), lin.weight, lin.bias))
    assert set(lin.state_dict()) == {"weight", "bias"}  # nothing new is saved
    pack_linears(lin)
    twin = copy.deepcopy(lin)  # e.g. training's branch copies: the twin's weights are its own
    with torch.no_grad():
        twin.weight.mul_(2.0)
    with torch.inference_mode():
        assert torch.equal(twin(x.detach()), torch.nn.functional.linear(x.detach(), twin.weight, twin.bias))
    unpack_linears(lin)
    assert "forward" not in vars(lin) and not is_packed(lin)


def test_engine_packs_the_encoder_and_matches_an_unpacked_hf_forward(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The reference is a separately loaded Hugging Face model (the engine's own is packed)."""
    from transformers import AutoModelForSequenceClassification

    store = ModelStore(tmp_path / "store")
    policy = BatchPolicy.resolve("cpu", token_budget=2048, max_batch_size=32)
    packed = ScoringEngine(
        load_reward_model(str(tiny_llama_dir), store), policy=policy, cpu_packed_linear=True
    )
    plain = ScoringEngine(load_reward_model(str(tiny_llama_dir), store), policy=policy)  # the default: aten
    assert packed.packed_linears == 7 * 2 and plain.packed_linears == 0  # q k v o gate up down, 2 layers
    assert not is_packed(packed.model.score)  # the heads are the kernel's, not packed
    items = [Item(prompt=f"question {i} " * (i + 1), response=f"answer {i}") for i in range(9)]
    a = torch.tensor([s.rewards for s in packed.score(items)])
    b = torch.tensor([s.rewards for s in plain.score(items)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir).eval()
    norm = packed.manifest.normalization
    for item, row in zip(items[:3], a[:3], strict=True):
        ids = torch.tensor([packed.encode(item).input_ids])
        with torch.inference_mode():
            ref = hf(input_ids=ids).logits[0]
        if norm is not None:
            ref = (ref - torch.tensor(norm.mean)) / torch.tensor(norm.std)
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)


def test_setting_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRA_RM_CPU_PACKED_LINEAR", raising=False)
    assert Settings().cpu_packed_linear is False  # off by default: the A/B did not earn it
    monkeypatch.setenv("HYDRA_RM_CPU_PACKED_LINEAR", "true")
    assert Settings().cpu_packed_linear is True
