"""What the README tells a new user matches what the code does (each a break found in a user's first
hour: a missing command, a train synopsis without options they needed, wrong log and reply names)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_mentions_toydata() -> None:
    assert "hydra-rm experiment toydata" in README


def test_the_train_synopsis_lists_every_option() -> None:
    from training.cli import app

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    start = README.index("hydra-rm train --data")
    synopsis = README[start : README.index("```", start)]
    missing = [
        opt
        for param in command.params
        for opt in param.opts[:1]
        if opt.startswith("--") and opt not in synopsis and param.name != "help"
    ]
    assert not missing, missing


def test_the_readme_names_the_trl_log_key_of_the_plain_function() -> None:
    from client import trl

    assert f"`rewards/{trl.reward.__name__}/mean`" in README
    assert f"`rewards/{trl.HydraReward('http://x').__name__}/mean`" in README


def test_the_empty_get_reward_reply_is_the_one_documented(live) -> None:
    with live.client() as c:
        reply = c.post("/get_reward", json={"query": []}).json()
    documented = re.findall(r'answer(?:s|ed)\s+`(\{"rewards".*?\})`', README)
    assert len(documented) == 2 and all(json.loads(d) == reply for d in documented), (documented, reply)


def test_the_readme_says_sighup_drains() -> None:
    assert "SIGHUP" in README[README.index("**SIGTERM") : README.index("**SIGTERM") + 600]
