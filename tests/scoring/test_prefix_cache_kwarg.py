"""The KV cache goes to a decoder by the keyword its forward takes: transformers 5.2x names it `cache`,
5.17 (the H200 image of the first GPU run) `past_key_values` and silently ignored `cache`, which left
the prefix cache empty and switched sharing off."""

from __future__ import annotations

from torch import nn

from scoring.prefix import _cache_kwarg


class _New(nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return cache


class _Old(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return past_key_values


def test_cache_keyword_follows_the_forward_signature() -> None:
    assert _cache_kwarg(_New()) == "cache"
    assert _cache_kwarg(_Old()) == "past_key_values"
    marker = object()
    assert _Old()(**{_cache_kwarg(_Old()): marker}) is marker


def test_the_pinned_transformers_llama_takes_cache(tiny_llama_dir) -> None:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir)
    assert _cache_kwarg(model.base_model) in ("cache", "past_key_values")
