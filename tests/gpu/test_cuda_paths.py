"""CUDA-only checks for the first GPU session; skipped on CPU (all of tests/ runs there).

Run with the compiler, not the interpreter: `TRITON_INTERPRET=0 python -m pytest tests/gpu -q`.
The interpreter tests in tests/kernels check the kernel's semantics; these check what only a GPU
shows: the compiled kernel against the reference, one compiled variant across batch sizes and
lengths (B and T are not specialised), launches on a second device, and the engine on CUDA against
the Hugging Face model's own logits.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

mr = importlib.import_module("kernels.multihead_reward")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not mr.triton_available() or mr._interpreted(),
    reason="needs a CUDA GPU, triton, and TRITON_INTERPRET=0",
)


def _case(b: int, t: int, h: int, k: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(b * 1000 + t)
    hidden = torch.randn(b, t, h, device=device, generator=g).to(dtype)
    index = torch.randint(0, t, (b,), device=device, generator=g)
    weight = (torch.randn(k, h, device=device, generator=g) / h**0.5).to(dtype)
    bias = torch.randn(k, device=device, generator=g).to(dtype)
    return hidden, index, weight, bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_matches_reference_with_one_variant_across_b_and_t(dtype):
    # H and K fixed, so launch_config is the same for all these B (BLOCK_B stays 16 up to
    # 2 * n_sm * 16 rows): any extra cache entry would be a specialisation on B or T.
    # The count is taken after the first launch: an earlier test (the novelty kernels) may already have
    # compiled this dtype's variant, which the first H200 run showed (0 new variants, not 1).
    caches = mr._multihead_reward_kernel.device_caches[torch.cuda.current_device()][0]
    before = None
    for b, t in [(1, 1), (3, 7), (16, 16), (17, 33), (64, 100), (200, 5)]:
        args = _case(b, t, 4096, 4, dtype, "cuda")
        got = mr.multihead_reward_triton(*args)
        before = len(caches) if before is None else before
        ref = mr.multihead_reward_reference(*args, compute_dtype=torch.float64)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g.double(), r, atol=2e-3, rtol=2e-3)
    assert len(caches) == before, f"{len(caches) - before} more variants compiled across B and T"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_the_second_device_from_a_thread_on_the_first():
    import threading

    args = _case(8, 9, 1024, 4, torch.bfloat16, "cuda:1")
    out: list = []
    torch.cuda.set_device(0)
    th = threading.Thread(target=lambda: out.append(mr.multihead_reward_triton(*args)))
    th.start()
    th.join()
    ref = mr.multihead_reward_reference(*args)
    torch.testing.assert_close(out[0].rewards, ref.rewards, atol=2e-3, rtol=2e-3)


def test_engine_on_cuda_matches_hf_logits(tmp_path: Path):
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import Item, ScoringEngine
    from tests.builders import build_tiny_llama

    d = build_tiny_llama(tmp_path / "m", hidden=64)
    rm = load_reward_model(str(d), ModelStore(tmp_path / "s"), device="cuda", dtype=torch.float32)
    engine = ScoringEngine(rm)
    texts = ["a short one", "a somewhat longer text that needs padding in the batch", "mid length"]
    scores = engine.score([Item(text=t) for t in texts])
    for t, s in zip(texts, scores, strict=True):
        ids = torch.tensor([engine.encode(Item(text=t)).input_ids], device="cuda")
        with torch.inference_mode():
            ref = rm.model(input_ids=ids).logits[0].float().cpu()
        # TF32 is on for CUDA engines: ~1e-3 relative, not the 1e-5 of the CPU parity tests.
        torch.testing.assert_close(torch.tensor(s.rewards), ref, atol=5e-3, rtol=5e-3)
