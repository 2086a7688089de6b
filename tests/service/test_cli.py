"""The `hydra-rm models` and `demo` commands, as an operator uses them."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from service.cli import app


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
