"""The README's settings table is the one generated from the Settings field descriptions."""

from __future__ import annotations

from pathlib import Path

from cli.settings_doc import END, START, replace_block, settings_block, settings_table
from scoring.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_settings_field_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description (it becomes the README row)"
        assert f"`HYDRA_RM_{name.upper()}`" in settings_table()


def test_readme_table_is_up_to_date():
    text = README.read_text()
    assert START in text and END in text
    assert settings_block() in text, (
        "README settings table is stale: python -m cli.settings_doc --write README.md"
    )


def test_replace_block_rewrites_only_the_table():
    text = f"intro\n{START}\nold table\n{END}\noutro\n"
    assert replace_block(text) == f"intro\n{settings_block()}\noutro\n"
