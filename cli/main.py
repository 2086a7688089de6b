"""`hydra-rm` command line: serve, score JSONL files, and manage the model store."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
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


def _settings(**overrides: object):  # noqa: ANN202 - scoring.settings.Settings
    from scoring.settings import Settings

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
    allow_constant_rewards: Annotated[
        bool,
        typer.Option(
            help="Import even if a head gives the same reward to every probe input "
            "(normally a sign of zeroed or corrupted weights)."
        ),
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Publish a checkpoint into the store atomically, with checksums of every file.

    The copy is verified against the source's own manifest checksums (when it has them), loaded and
    self-checked as `serve` would, and probed; a refused import publishes nothing.
    """
    _quiet_hf()
    from transformers.utils import logging as hf_logging

    from cli.import_check import ImportCheck, check_importable
    from model_store import ModelStore, ModelStoreError

    hf_logging.disable_progress_bar()  # the import prints its verdict, not a weight-loading bar

    settings = _settings(store_root=store)
    checked: list[ImportCheck] = []

    def check(copy: Path) -> None:
        try:
            checked.append(
                check_importable(
                    copy, settings, allow_pickle=allow_pickle, allow_constant=allow_constant_rewards
                )
            )
        except ModelStoreError as e:  # name the operator's directory, not the hidden copy being checked
            raise type(e)(str(e).replace(str(copy), str(path))) from e

    try:
        ref = ModelStore(settings.store_root).publish(
            path, name, version, allow_pickle=allow_pickle, check=check
        )
    except (ModelStoreError, FileExistsError) as e:
        raise _fail(f"{e}\nrefused: nothing was published") from e
    if checked and checked[0].constant_heads:
        typer.secho(
            f"WARNING: head(s) {', '.join(checked[0].constant_heads)} give the same reward to every "
            "probe input; imported only because of --allow-constant-rewards",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(f"imported {ref} -> {ref.path} (loaded and self-checked as `serve` would)")


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
    from scoring.engine import Item
    from scoring.settings import build_engine

    settings = _settings(model=model, store_root=store)
    engine = build_engine(settings)
    agg = settings.resolved_aggregation(engine)
    items = [
        Item(prompt="What is the capital of France?", response="The capital of France is Paris."),
        Item(prompt="What is the capital of France?", response="I don't know, maybe bananas."),
    ]
    for item, s in zip(items, engine.score(items), strict=True):
        heads = ", ".join(f"{n}={r:+.4f}" for n, r in zip(engine.head_names, s.rewards, strict=True))
        typer.echo(f"{item.response!r}: reward({agg.name})={agg.apply(s):+.4f} std={s.std:.4f} [{heads}]")


@app.command()
def score(
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help="JSONL: {prompt, response} | {messages} | {text}, optional id; validated as /v1/score items.",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL of rewards, in input order.")],
    model: Annotated[str | None, typer.Option(help="Model spec (default: the embedded default).")] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Bad lines go here (default: <output stem>.errors.jsonl).")
    ] = None,
    aggregation: Annotated[
        str | None, typer.Option(help="min, mean, max, uwo or head:<i> (default: the model's).")
    ] = None,
    uwo_lambda: Annotated[
        float | None, typer.Option(help="lambda for uwo = mean - lambda * variance.")
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Lines per checkpoint (memory is bounded by this).")
    ] = 512,
    restart: Annotated[bool, typer.Option(help="Ignore earlier progress and overwrite the output.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with items/s.")] = True,
    store: StoreOpt = None,
) -> None:
    """Score a JSONL file; interrupted runs resume where they stopped, without duplicates."""
    _quiet_hf()
    from jobs.local import JobError, ScoreJob, check_paths, default_errors_path, os_error
    from model_store import ModelStoreError
    from scoring.settings import build_engine

    try:
        check_paths(input, output, errors or default_errors_path(output))
        # CLI options override HYDRA_RM_AGGREGATION / HYDRA_RM_UWO_LAMBDA, as `serve` honours them too.
        settings = _settings(model=model, store_root=store, aggregation=aggregation, uwo_lambda=uwo_lambda)
        engine = build_engine(settings)
        agg = settings.resolved_aggregation(engine)
        job = ScoreJob(engine, input, output, errors, aggregation=agg, chunk_size=chunk_size)
        result = job.run(restart=restart, progress_bar=progress)
    except (JobError, ModelStoreError, ValueError) as e:
        raise _fail(str(e)) from e
    except OSError as e:  # e.g. the disk filled up mid-run: one line, not a traceback
        raise _fail(str(os_error(e))) from e
    if result.skipped == result.lines and result.scored == 0 and result.errors == 0:
        typer.echo(f"{output} is already complete ({result.lines} lines); use --restart to score again")
        return
    typer.echo(
        f"scored {result.scored} items, {result.errors} errors (-> {job.errors}), "
        f"{result.skipped} lines resumed from an earlier run; output: {output}"
    )


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Bind address (default: $HYDRA_RM_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: $HYDRA_RM_PORT or 8000).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Store name, directory or hub id (default: the embedded default).")
    ] = None,
    store: StoreOpt = None,
    log_level: Annotated[str | None, typer.Option(help="critical, error, warning, info or debug.")] = None,
) -> None:
    """Serve the HTTP API (every other setting comes from HYDRA_RM_* variables; see the README)."""
    _quiet_hf()
    from pydantic import ValidationError

    from service.server import run

    try:
        settings = _settings(host=host, port=port, model=model, store_root=store, log_level=log_level)
    except ValidationError as e:
        raise _fail(f"invalid settings: {e}") from e
    run(settings)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


# -- Ray (service/ray_serve.py, jobs/ray_job.py); `pip install ray[serve,data]` --------------------
def _ray_init(address: str | None, host: str | None = None, dashboard_port: int | None = None) -> None:
    """Join `address`, or start a local cluster bound to `host` (Ray's own default: the machine's
    address) with its dashboard on `dashboard_port`. Ray's other ports are pinned by starting the
    cluster with `ray start --head --port ... --node-ip-address ...` and passing --address (README)."""
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as e:
        raise _fail("Ray is not installed: pip install 'ray[serve,data]'") from e
    kwargs: dict[str, object] = {}
    if host:
        kwargs.update(_node_ip_address=host, dashboard_host=host)
    if dashboard_port is not None:
        kwargs.update(include_dashboard=True, dashboard_port=dashboard_port)
    ray.init(address=address, ignore_reinit_error=True, **kwargs)


RayAddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a new local one)."),
]
RayHostOpt = Annotated[
    str | None,
    typer.Option("--ray-host", help="Address a new local Ray cluster binds to (and its dashboard)."),
]
DashboardPortOpt = Annotated[
    int | None, typer.Option(help="Dashboard port of a new local Ray cluster (default: none started).")
]
NumGpusOpt = Annotated[
    float | None, typer.Option(help="GPUs per replica/actor (default: 1 when the cluster has GPUs, else 0).")
]


@app.command("score-ray")
def score_ray(
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL, as for `hydra-rm score`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL of rewards, in input order.")],
    model: Annotated[str | None, typer.Option(help="Model spec (default: the embedded default).")] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Bad lines go here (default: <output stem>.errors.jsonl).")
    ] = None,
    aggregation: Annotated[str | None, typer.Option(help="min, mean, max, uwo or head:<i>.")] = None,
    uwo_lambda: Annotated[float | None, typer.Option(help="lambda for uwo.")] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Lines per checkpoint and per Ray task (default: the file over 4 tasks per actor, "
            "at most 512).",
        ),
    ] = None,
    actors: Annotated[int, typer.Option(min=1, help="Engines in the Ray Data actor pool.")] = 2,
    num_cpus: Annotated[float, typer.Option(help="CPUs per actor.")] = 1.0,
    num_gpus: NumGpusOpt = None,
    wait_s: Annotated[
        float,
        typer.Option(min=0.0, help="Longest to wait for the cluster to free the actors' CPUs/GPUs."),
    ] = 120.0,
    address: RayAddressOpt = None,
    ray_host: RayHostOpt = None,
    dashboard_port: DashboardPortOpt = None,
    restart: Annotated[bool, typer.Option(help="Ignore earlier progress and overwrite the output.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with items/s.")] = True,
    store: StoreOpt = None,
) -> None:
    """`score` on a Ray cluster: Ray Data actors score the chunks; same output, order, errors and resume."""
    _quiet_hf()
    from jobs.local import JobError
    from model_store import ModelStoreError

    _ray_init(address, ray_host, dashboard_port)
    from jobs.ray_job import RayScoreJob

    try:
        job = RayScoreJob(
            _settings(model=model, store_root=store, aggregation=aggregation, uwo_lambda=uwo_lambda),
            input,
            output,
            errors,
            chunk_size=chunk_size,
            actors=actors,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            wait_s=wait_s,
        )
        result = job.run(restart=restart, progress_bar=progress)
    except (JobError, ModelStoreError, ValueError) as e:
        raise _fail(str(e)) from e
    typer.echo(
        f"scored {result.scored} items, {result.errors} errors (-> {job.errors}), "
        f"{result.skipped} lines resumed from an earlier run; output: {output}"
    )


@app.command("serve-ray")
def serve_ray(
    replicas: Annotated[int, typer.Option(min=1, help="Serve replicas (one engine each).")] = 1,
    host: Annotated[str | None, typer.Option(help="Serve HTTP address (default: $HYDRA_RM_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Serve HTTP port (default: $HYDRA_RM_PORT).")] = None,
    model: Annotated[str | None, typer.Option(help="Model spec (default: the embedded default).")] = None,
    num_cpus: Annotated[float, typer.Option(help="CPUs per replica.")] = 1.0,
    num_gpus: NumGpusOpt = None,
    address: RayAddressOpt = None,
    ray_host: RayHostOpt = None,
    dashboard_port: DashboardPortOpt = None,
    store: StoreOpt = None,
) -> None:
    """Serve the same HTTP API from N Ray Serve replicas (blocks until interrupted)."""
    _quiet_hf()
    _ray_init(address, ray_host, dashboard_port)
    from service import ray_serve

    url = ray_serve.run(
        _settings(model=model, store_root=store),
        replicas=replicas,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        host=host,
        port=port,
        blocking=False,
    )
    typer.echo(f"hydra-rm on Ray Serve: {url} ({replicas} replicas); Ctrl-C, SIGTERM or SIGHUP stops it")
    from ray import serve

    block_until_stopped(serve.shutdown)


def block_until_stopped(shutdown: Callable[[], None]) -> None:
    """Block until Ctrl-C, SIGTERM or SIGHUP, then run `shutdown` (for serve-ray: `serve.shutdown()`,
    which drains the replicas up to HYDRA_RM_DRAIN_TIMEOUT_S). Without the handlers SIGTERM ended the
    process and left the Serve application running on the cluster, holding its CPUs. SIGINT gets its
    handler too, as uvicorn gives `serve` one: a process started in the background by a
    non-interactive shell inherits SIGINT ignored, and Ctrl-C / `kill -INT` then did nothing (hit by
    the signal test in a clean-clone CI run launched with `nohup ... &`)."""
    import signal
    import time

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for sig in previous:  # a second signal must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Training, evaluation and experiments live in training/ (torch training stack, accelerate, peft):
# these wrappers import it only when one of its commands runs, so serving never imports training.
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("train", context_settings=_PASS_THROUGH, add_help_option=False)
def train_cmd(ctx: typer.Context) -> None:
    """Train K Bradley-Terry reward heads on a shared encoder (`hydra-rm train --help`)."""
    from training.cli import run

    run(["train", *ctx.args])


@app.command("eval", context_settings=_PASS_THROUGH, add_help_option=False)
def eval_cmd(ctx: typer.Context) -> None:
    """Evaluate a reward model on preference pairs: accuracy, calibration, disagreement (`--help`)."""
    from training.cli import run

    run(["eval", *ctx.args])


# calibrate composes training's fit with the import check, so it lives here (cli imports everyone).
@app.command("calibrate")
def calibrate(
    model: Annotated[str, typer.Option(help="Store name (`name` or `name:version`), directory or hub id.")],
    data: Annotated[
        Path,
        typer.Option(
            help="JSONL reference set: items ({text} | {prompt, response} | {messages}) or preference "
            "pairs ({prompt, chosen, rejected}: both responses count), e.g. the RM's training data or "
            "on-policy samples from the first RL steps."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="Store name to publish under (default: the model's own store name).")
    ] = None,
    lam: Annotated[
        float | None,
        typer.Option(
            "--lambda", help="Ridge lambda of the Gram matrix (default: model_store.novelty's, 0.01)."
        ),
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of the texts kept out of the fit for the quantiles.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the fit/quantile split.")] = 0,
    rank: Annotated[
        int | None, typer.Option(help="Keep only the top R eigen-directions (default: exact, full rank).")
    ] = None,
    store: Annotated[Path | None, typer.Option(help="Model store root.")] = None,
) -> None:
    """Fit the feature-space novelty statistic for any served model and publish it as a new version.

    u(x) = sqrt(phi^T (Phi^T Phi + lambda I)^-1 phi) over the pooled state the heads read; served as
    `novelty` / `novelty_percentile` and usable as the `lcb` aggregation. The new version is loaded,
    self-checked and probed as `hydra-rm models import` does before it becomes visible.
    """
    from cli.import_check import check_importable
    from model_store import ModelStore
    from model_store.errors import ModelStoreError
    from model_store.novelty import DEFAULT_LAMBDA
    from training.calibrate import calibrate

    lam = DEFAULT_LAMBDA if lam is None else lam
    settings = _settings(store_root=store)  # $HYDRA_RM_STORE_ROOT or the default, as `serve`
    model_store = ModelStore(settings.store_root)
    try:
        ref, info = calibrate(
            model, data, model_store, name=name, lam=lam, holdout=holdout, seed=seed, rank=rank,
            check=lambda copy: check_importable(copy, settings),
        )  # fmt: skip
    except (ModelStoreError, ValueError, OSError, FileExistsError) as e:
        raise _fail(f"{e}\nnothing was published") from e
    q = dict(zip(info.quantiles.probs, info.quantiles.values, strict=True))
    typer.echo(
        json.dumps(
            {
                "published": str(ref),
                "path": str(ref.path),
                "fit_rows": info.n,
                "quantile_rows": info.quantiles.n,
                "lambda": info.lam,
                "rank": info.rank,
                "u_median": q.get(0.5),
                "u_p95": q.get(0.95),
                "reward_std": info.reward_std,
            },
            indent=2,
        )  # fmt: skip
    )


@app.command("experiment", context_settings=_PASS_THROUGH, add_help_option=False)
def experiment_cmd(ctx: typer.Context) -> None:
    """Offline experiments, e.g. `hydra-rm experiment overopt --out docs/experiments/` (`--help`)."""
    from training.cli import run

    run(["experiment", *ctx.args])
