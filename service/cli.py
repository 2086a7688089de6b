"""`hydra-rm` command line: serve, score JSONL files, and manage the model store."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Multi-head reward model service for RLHF."
)
models_app = typer.Typer(no_args_is_help=True, help="List, import and inspect models in the store.")
app.add_typer(models_app, name="models")

StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store", help="Model store root (default: $HYDRA_RM_STORE_ROOT or ~/.cache/hydra-rm/models)."
    ),
]


def _quiet_hf() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _settings(**overrides: object):  # noqa: ANN202 - service.settings.Settings
    from service.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@models_app.command("list")
def models_list(store: StoreOpt = None) -> None:
    """Every model version in the store (the default model appears once it has been built)."""
    from model_store import ModelStore

    root = _settings(store_root=store).store_root
    refs = ModelStore(root).list()
    if not refs:
        typer.echo(f"no models in {root}")
    for ref in refs:
        typer.echo(f"{ref.name}:{ref.version}\t{ref.path}")


@models_app.command("import")
def models_import(
    path: Annotated[
        Path, typer.Argument(help="A Hugging Face sequence-classification checkpoint directory.")
    ],
    name: Annotated[str, typer.Option("--name", help="Name in the store.")],
    version: Annotated[
        str | None, typer.Option("--version", help="Version label (default: next vN).")
    ] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickled .bin weights.")] = False,
    store: StoreOpt = None,
) -> None:
    """Publish a checkpoint into the store atomically, with checksums of every file."""
    from model_store import ModelStore, ModelStoreError

    try:
        ref = ModelStore(_settings(store_root=store).store_root).publish(
            path, name, version, allow_pickle=allow_pickle
        )
    except (ModelStoreError, FileExistsError) as e:
        raise _fail(str(e)) from e
    typer.echo(f"imported {ref} -> {ref.path}")


@models_app.command("show")
def models_show(
    spec: Annotated[str, typer.Argument(help="`name` or `name:version`.")],
    store: StoreOpt = None,
) -> None:
    """Print a model's manifest (heads, pooling, normalisation, checksums)."""
    from model_store import ModelStore, ModelStoreError, RewardManifest

    try:
        ref = ModelStore(_settings(store_root=store).store_root).resolve(spec)
    except ModelStoreError as e:
        raise _fail(str(e)) from e
    manifest = RewardManifest.read(ref.path)
    out = {"name": ref.name, "version": ref.version, "path": str(ref.path)}
    out["manifest"] = manifest.model_dump() if manifest else None
    typer.echo(json.dumps(out, indent=2))


@app.command()
def demo(
    model: Annotated[str | None, typer.Option(help="Model spec (default: the embedded default).")] = None,
    store: StoreOpt = None,
) -> None:
    """Score two example responses and print every head: a smoke test of the whole engine."""
    _quiet_hf()
    from service.aggregation import aggregate
    from service.engine import Item
    from service.settings import build_engine

    engine = build_engine(_settings(model=model, store_root=store))
    items = [
        Item(prompt="What is the capital of France?", response="The capital of France is Paris."),
        Item(prompt="What is the capital of France?", response="I don't know, maybe bananas."),
    ]
    for item, s in zip(items, engine.score(items), strict=True):
        agg = aggregate(s, engine.manifest.default_aggregation, engine.manifest.uwo_lambda)
        heads = ", ".join(f"{n}={r:+.4f}" for n, r in zip(engine.head_names, s.rewards, strict=True))
        typer.echo(
            f"{item.response!r}: reward({engine.manifest.default_aggregation})={agg:+.4f} std={s.std:.4f} [{heads}]"
        )


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
