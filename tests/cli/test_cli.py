"""The `hydra-rm models` and `demo` commands, as an operator uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app


def test_models_import_list_show(tiny_llama_dir: Path, tmp_path: Path) -> None:
    store = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    res = runner.invoke(app, ["models", "list", *store])
    assert res.exit_code == 0 and "no models" in res.output
    res = runner.invoke(app, ["models", "import", str(tiny_llama_dir), "--name", "helpful-rm", *store])
    assert res.exit_code == 0, res.output
    assert "helpful-rm:v1" in res.output
    res = runner.invoke(app, ["models", "list", *store])
    assert "helpful-rm:v1" in res.output
    res = runner.invoke(app, ["models", "show", "helpful-rm", *store])
    shown = json.loads(res.output)
    assert shown["version"] == "v1" and shown["manifest"]["num_heads"] == 4
    assert "model.safetensors" in shown["manifest"]["files"]
    res = runner.invoke(app, ["models", "import", str(tiny_llama_dir), "--name", "../escape", *store])
    assert res.exit_code == 1 and "invalid model name" in res.output
    res = runner.invoke(app, ["models", "show", "nope", *store])
    assert res.exit_code == 1 and "no model named" in res.output


def test_demo_scores_with_every_head(tiny_llama_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--model", str(tiny_llama_dir), "--store", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and all("reward(min)=" in x and "helpful=" in x and "concise=" in x for x in lines)


def test_score_serve_and_demo_resolve_the_aggregation_alike(
    tiny_llama_dir: Path, tiny_engine, tmp_path: Path, monkeypatch
) -> None:
    """HYDRA_RM_AGGREGATION / HYDRA_RM_UWO_LAMBDA mean the same to `score`, `serve` and `demo`."""
    from scoring.settings import Settings
    from service.metrics import Metrics
    from service.runtime import ScoringService

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "response": "hello there"}) + "\n")
    runner = CliRunner()
    for agg, lam in (("mean", None), ("uwo", "0.25"), ("head:2", None)):
        monkeypatch.setenv("HYDRA_RM_AGGREGATION", agg)
        if lam is None:
            monkeypatch.delenv("HYDRA_RM_UWO_LAMBDA", raising=False)
        else:
            monkeypatch.setenv("HYDRA_RM_UWO_LAMBDA", lam)
        out = tmp_path / f"out-{agg}.jsonl"
        args = ["score", "-i", str(src), "-o", str(out), "--model", str(tiny_llama_dir)]
        res = runner.invoke(app, [*args, "--store", str(tmp_path / "s"), "--no-progress"])
        assert res.exit_code == 0, res.output
        [row] = [json.loads(x) for x in out.read_text().splitlines()]
        heads = list(row["heads"].values())
        mean = sum(heads) / len(heads)
        expected = {
            "mean": mean,
            "uwo": mean - 0.25 * sum((h - mean) ** 2 for h in heads) / len(heads),
            "head:2": heads[2],
        }[agg]
        assert row["aggregation"] == agg and row["reward"] == pytest.approx(expected, abs=1e-6)
        served = ScoringService(Settings(), tiny_engine, Metrics()).describe()
        assert served["default_aggregation"] == agg
        assert served["uwo_lambda"] == (0.25 if lam else 1.0)  # the manifest's lambda unless set
        demo = runner.invoke(app, ["demo", "--model", str(tiny_llama_dir), "--store", str(tmp_path / "s")])
        assert demo.exit_code == 0 and f"reward({agg})=" in demo.output, demo.output
    res = runner.invoke(app, ["score", "-i", str(src), "-o", str(tmp_path / "x.jsonl"), "--model",
                              str(tiny_llama_dir), "--uwo-lambda", "-1", "--store", str(tmp_path / "s")])  # fmt: skip
    assert res.exit_code == 1 and "uwo_lambda" in res.output
