"""The engine's host/device seams, checked on CPU: one device-to-host transfer per batch, no pinning
off CUDA, TF32 left alone off CUDA, and attention chosen explicitly by the loader."""

from __future__ import annotations

from pathlib import Path

import torch

from model_store import ModelStore
from model_store.loader import load_reward_model
from scoring.engine import Item


def test_one_device_to_host_transfer_per_batch(tiny_engine, monkeypatch):
    batch = [tiny_engine.encode(Item(text=t)) for t in ["short", "a somewhat longer text to pad", "mid one"]]
    # forward_padded is one encoder pass; forward (prefix sharing on) may split a window into several
    # passes (padding cap, shared groups), each with its own single transfer through the same helper.
    expected = tiny_engine.forward_padded(batch)
    calls = {"cpu": 0, "tolist": 0}
    real_cpu, real_tolist = torch.Tensor.cpu, torch.Tensor.tolist

    def cpu(self: torch.Tensor, *a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["cpu"] += 1
        return real_cpu(self, *a, **kw)

    def tolist(self: torch.Tensor):  # noqa: ANN202
        calls["tolist"] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    got = tiny_engine.forward_padded(batch)
    monkeypatch.undo()
    assert calls == {"cpu": 1, "tolist": 1}
    assert [s.rewards for s in got] == [s.rewards for s in expected]
    for s in got:  # the packed row splits back into the right fields
        assert s.min == min(s.rewards) and s.max == max(s.rewards)
        assert abs(s.mean - sum(s.rewards) / len(s.rewards)) < 1e-6


def test_no_pinning_and_no_tf32_switch_on_cpu(tiny_engine, monkeypatch):
    def refuse(self: torch.Tensor, *a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("pin_memory called on a CPU engine")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    assert tiny_engine.device.type == "cpu"
    assert len(tiny_engine.score([Item(text="pinned?"), Item(text="not on CPU")])) == 2
    assert torch.backends.cuda.matmul.allow_tf32 is False  # only a CUDA engine turns it on


def test_loader_chooses_sdpa_where_the_architecture_has_it(tiny_llama_dir: Path, tmp_path: Path, caplog):
    caplog.set_level("INFO", logger="model_store.loader")
    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path / "s"))
    assert rm.model.config._attn_implementation == "sdpa"
    assert rm.info["attn_implementation"] == "sdpa"
    assert any("sdpa attention" in r.getMessage() for r in caplog.records)


def test_loader_falls_back_to_eager_when_sdpa_is_unsupported(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, caplog
):
    from transformers import AutoModelForSequenceClassification

    real = AutoModelForSequenceClassification.from_pretrained.__func__
    asked: list[str] = []

    def no_sdpa(cls, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        asked.append(kw["attn_implementation"])
        if kw["attn_implementation"] == "sdpa":
            raise ValueError(
                "X does not support an attention implementation through scaled_dot_product_attention"
            )
        return real(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(no_sdpa))
    caplog.set_level("INFO", logger="model_store.loader")
    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path / "s"))
    assert asked == ["sdpa", "eager"]
    assert rm.info["attn_implementation"] == "eager"
    assert any("eager attention" in r.getMessage() for r in caplog.records)
