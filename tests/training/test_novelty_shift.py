"""`hydra-rm experiment novelty-shift`: one shift generator (training/shift.py), splits that never share a
text, and lambda chosen on the validation split only.

(The experiment's own shift generator, with 2-word praise and salad as long as the response, was replaced by
training/shift.py's kinds so both experiments measure the same shifts; the kinds' pins live in
tests/training/test_toptrain.py.)"""

from __future__ import annotations

import pytest
import torch

from training import novelty_shift as ns
from training.shift import KINDS, LABELS


def test_splits_are_disjoint_and_cover_every_kind() -> None:
    rows, val, ev = ns.draw_data(5, train_pairs=30, val_pairs=12, held_pairs=15)
    train = {r[k] for r in rows for k in ("chosen", "rejected")}
    assert set(val.shifts) == set(ev.shifts) == set(KINDS) == set(LABELS)
    assert not (train & val.texts()) and not (train & ev.texts()) and not (val.texts() & ev.texts())
    assert len(ev.held) == 30 and all(len(ev.shifts[k]) >= 28 for k in KINDS)
    # Shifts keep the held-out prompts and are seeded: the same draw gives the same texts.
    assert {it.prompt for it in ev.shifts["praise"]} <= {it.prompt for it in ev.held}
    assert ns.draw_data(5, 30, 12, 15)[2].texts() == ev.texts() != ns.draw_data(6, 30, 12, 15)[2].texts()


def test_make_split_drops_excluded_texts() -> None:
    full = ns.make_split(9, 10, 19, set())
    gone = {full.held[0].response or "", full.shifts["salad"][3].response or ""}
    cut = ns.make_split(9, 10, 19, gone)
    assert not (gone & cut.texts()) and len(cut.held) == len(full.held) - 1


def test_split_aurocs_per_kind_and_pooled() -> None:
    held = torch.zeros(4)
    score = {"held-out": held, **{k: torch.full((4,), float(i)) for i, k in enumerate(KINDS)}}
    a = ns.split_aurocs(score)
    assert a[KINDS[0]] == 0.5 and all(a[k] == 1.0 for k in KINDS[1:])
    assert a[ns.ALL] == pytest.approx((0.5 * 4 * 4 + 4 * 12) / (4 * 16))


def test_choose_lambda_takes_the_best_validation_value_and_ties_keep_the_default() -> None:
    assert ns.choose_lambda({0.1: 0.8, 1.0: 0.7, 10.0: 0.6}) == 0.1
    d = ns.DEFAULT_LAMBDA  # a tie goes to the value nearest the default in log scale (30x beats 1/100x)
    assert ns.choose_lambda({d / 10: 0.7, d: 0.7, d * 10: 0.7}) == d
    assert ns.choose_lambda({d / 100: 0.7, d * 30: 0.7, d * 1000: 0.6}) == d * 30


def test_measure_chooses_lambda_on_validation_and_scores_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """With features that make the validation prefer a small lambda and the evaluation a large one, the
    reported lambda is the validation's and the evaluation AUROC is u's at that lambda."""
    g = torch.Generator().manual_seed(0)
    train_phi = torch.randn(40, 6, generator=g)

    def fake(self: ns._Features, items: list) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG001
        n = len(items)
        if n == 40:
            return train_phi, torch.zeros(n)
        return torch.randn(n, 6, generator=g) * (3.0 if items[0].response == "shifted" else 1.0), torch.zeros(
            n
        )

    monkeypatch.setattr(ns._Features, "__call__", fake)
    item = ns.Item(prompt="p", response="x")
    shift = ns.Item(prompt="p", response="shifted")
    split = ns.Split([item] * 10, {k: [shift] * 10 for k in KINDS})
    res = ns.measure(None, [item] * 40, split, split, [0.1, 1.0, 10.0])
    vals = {float(k): v[ns.ALL] for k, v in res["validation_u"].items()}
    assert res["chosen_lambda"] == ns.choose_lambda(vals)
    assert 0.0 <= res["u"][ns.ALL] <= 1.0 and res["head std"][ns.ALL] == 0.5
