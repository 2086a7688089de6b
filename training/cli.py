"""`hydra-rm train | eval | experiment`: the command functions (registered lazily by cli.main)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from training.diversity import DIVERSITY

if TYPE_CHECKING:
    from model_store import ModelStore
    from training.data import Pair
    from training.trainer import TrainConfig


def _store(store: Path | None):  # noqa: ANN202 - model_store.ModelStore
    from model_store import ModelStore
    from scoring.settings import Settings

    return ModelStore(store or Settings().store_root)  # $HYDRA_RM_STORE_ROOT or the default, as `serve`


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def train(
    data: Annotated[Path, typer.Option(help="JSONL of {prompt, chosen, rejected} (strings or chat lists).")],
    base: Annotated[str, typer.Option(help="Base encoder/decoder: store name, local directory or hub id.")],
    name: Annotated[str | None, typer.Option(help="Publish to the store under this name.")] = None,
    heads: Annotated[int, typer.Option(min=1, help="K, the number of reward heads.")] = 3,
    head_names: Annotated[
        str | None, typer.Option(help="Comma-separated head names (default head_i).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    lr: Annotated[float, typer.Option(help="Encoder learning rate (AdamW).")] = 2e-5,
    head_lr: Annotated[float, typer.Option(help="Head learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per micro-batch.")] = 16,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int | None, typer.Option(help="Token limit (default: the base's).")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (accelerate).")] = "no",
    mode: Annotated[str, typer.Option(help="finetune, frozen (heads only) or lora (peft).")] = "finetune",
    lora_r: Annotated[int, typer.Option(min=1)] = 8,
    diversity: Annotated[str, typer.Option(help=f"How heads differ: {', '.join(DIVERSITY)}.")] = "shard",
    feature_blocks: Annotated[
        bool,
        typer.Option(
            help="Each head reads its own disjoint block of the pooled features (opt-in: on MiniLM it lowered "
            "head correlation but its min lost to a single model in best-of-n; docs/experiments)."
        ),
    ] = False,
    decorrelation: Annotated[
        float, typer.Option(min=0.0, help="Weight of a penalty on the heads' batch correlation.")
    ] = 0.0,
    branch_layers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Each head owns a copy of the last N encoder layers (+ pooler / final norm); 0: every head "
            "reads the one shared pooled state (opt-in: on MiniLM branches decorrelated the heads but did "
            "not improve best-of-n; docs/experiments/overopt-pretrained.md).",
        ),
    ] = 0,
    ensemble: Annotated[
        str, typer.Option(help="none, or full: K independent single-head models (seeds seed..seed+K-1).")
    ] = "none",
    reference_fraction: Annotated[
        float, typer.Option(help="Held-out share for normalisation, quantiles and metrics.")
    ] = 0.1,
    reference_data: Annotated[
        Path | None, typer.Option(help="A separate reference JSONL (then all of --data trains).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the checkpoint directory here.")] = None,
    version: Annotated[str | None, typer.Option(help="Store version (default: next vN).")] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Where checkpoints go (enables resume).")
    ] = None,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps (and each epoch).")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest checkpoint in --checkpoint-dir.")
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after N optimizer steps (with a checkpoint).")
    ] = None,
    cpu: Annotated[bool, typer.Option(help="Train on CPU even where a GPU is visible.")] = False,
    store: Annotated[Path | None, typer.Option(help="Model store root.")] = None,
) -> None:
    """Train K Bradley-Terry reward heads on a shared encoder; publish a model the service serves as is."""
    from model_store.manifest import sha256_file
    from training.trainer import TrainConfig

    _check_train_choices(name, output, diversity, mode, ensemble)
    if branch_layers and (feature_blocks or mode != "finetune" or ensemble != "none" or heads < 2):
        raise _fail(
            "--branch-layers needs --mode finetune, --heads >= 2, no --feature-blocks and no --ensemble"
        )
    pairs, reference = _read_pairs(data, reference_data)
    names = [s.strip() for s in head_names.split(",")] if head_names else None
    cfg = TrainConfig(
        heads=heads, head_names=names, epochs=epochs, seed=seed, lr_encoder=lr, lr_heads=head_lr,
        weight_decay=weight_decay, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
        mixed_precision=mixed_precision, mode=mode, lora_r=lora_r, lora_alpha=2 * lora_r,
        diversity=diversity, feature_blocks=feature_blocks, decorrelation=decorrelation,
        branch_layers=branch_layers, reference_fraction=reference_fraction, save_steps=save_steps,
        max_steps=max_steps, cpu=cpu,
    )  # fmt: skip
    runs = [("", cfg)]
    if ensemble == "full":  # the paper's baseline: K separately trained single-head models
        runs = [(f"-m{i}", replace(cfg, heads=1, head_names=None, seed=seed + i)) for i in range(heads)]
    model_store = _store(store)
    sha = sha256_file(data)
    for suffix, run_cfg in runs:
        ck = checkpoint_dir / (suffix.lstrip("-") or "model") if checkpoint_dir else None
        if not _train_one(
            run_cfg, pairs, base, model_store, reference, ck, sha, resume, suffix, name, output, version
        ):
            return


def _check_train_choices(
    name: str | None, output: Path | None, diversity: str, mode: str, ensemble: str
) -> None:
    if name is None and output is None:
        raise _fail("give --name (publish to the store) and/or --output (a directory)")
    if diversity not in DIVERSITY:
        raise _fail(f"--diversity must be one of {', '.join(DIVERSITY)}")
    if mode not in ("finetune", "frozen", "lora"):
        raise _fail("--mode must be finetune, frozen or lora")
    if ensemble not in ("none", "full"):
        raise _fail("--ensemble must be none or full")


def _read_pairs(data: Path, reference_data: Path | None) -> tuple[list[Pair], list[Pair] | None]:
    """The training pairs (with a warning when they carry no signal) and the optional reference set."""
    from training.data import DataError, check_signal, load_pairs

    try:
        pairs = load_pairs(data)
        warning = check_signal(pairs, data)
        reference = load_pairs(reference_data) if reference_data else None
    except (DataError, OSError) as e:
        raise _fail(str(e)) from e
    if warning:
        typer.secho(f"WARNING: {warning}", fg=typer.colors.YELLOW, err=True)
    return pairs, reference


def _train_one(
    cfg: TrainConfig, pairs: list[Pair], base: str, model_store: ModelStore, reference: list[Pair] | None,
    ck: Path | None, sha: str, resume: bool, suffix: str, name: str | None, output: Path | None,
    version: str | None,
) -> bool:  # fmt: skip
    """Train one model (of the ensemble), then save and/or publish it; False when --max-steps stopped it."""
    from model_store.errors import ModelStoreError
    from training.trainer import Trainer, publish, save_model

    try:
        trainer = Trainer(
            cfg, pairs, base, model_store, reference=reference, checkpoint_dir=ck, data_sha256=sha
        )
        result = trainer.run(resume=resume)
    except (ModelStoreError, ValueError) as e:
        raise _fail(str(e)) from e
    if not result.is_main_process:
        return True
    if not result.finished:
        typer.echo(f"stopped at step {len(result.history)} (--max-steps); resume with --resume")
        return False
    typer.echo(json.dumps({"model": (name or "") + suffix, **result.metrics}, indent=2))
    if output is not None:
        save_model(result, output / suffix.lstrip("-") if suffix else output)
    if name is not None:
        ref = publish(result, model_store, name + suffix, version)
        typer.echo(f"published {ref} at {ref.path}")
    return True


def eval_(
    model: Annotated[str, typer.Option(help="Store name, directory or hub id; comma-separated = ensemble.")],
    data: Annotated[Path, typer.Option(help="JSONL of {prompt, chosen, rejected}.")],
    output: Annotated[Path, typer.Option(help="report.json (the reliability PNG goes beside it).")],
    uwo_lambda: Annotated[float | None, typer.Option(help="UWO lambda (default: the model's).")] = None,
    store: Annotated[Path | None, typer.Option(help="Model store root.")] = None,
) -> None:
    """Accuracy per head and aggregation, ECE + reliability diagram, head correlation, disagreement AUROC."""
    from model_store.errors import ModelStoreError
    from training.data import DataError, load_pairs
    from training.evaluate import evaluate_model, format_table, write_report

    try:
        pairs = load_pairs(data)
        report = evaluate_model([s.strip() for s in model.split(",")], pairs, _store(store), uwo_lambda)
    except (DataError, OSError, ModelStoreError) as e:
        raise _fail(str(e)) from e
    report["data"] = str(data)
    out, png = write_report(report, output)
    typer.echo(format_table(report))
    typer.echo(f"wrote {out} and {png}")


experiment_app = typer.Typer(no_args_is_help=True, help="Offline experiments.")


@experiment_app.command("overopt")
def overopt(
    out: Annotated[Path, typer.Option(help="Directory for the table, PNG and raw JSON.")] = Path(
        "docs/experiments"
    ),
    quick: Annotated[bool, typer.Option(help="CI smoke test: 2 seeds, small pools (<= 3 min).")] = False,
    seeds: Annotated[int, typer.Option(min=2, help="Seeds (full run).")] = 10,
    pool_size: Annotated[int, typer.Option(help="Candidates per prompt (power of 2).")] = 4096,
    prompts: Annotated[int, typer.Option(min=1, max=64, help="Prompts with a candidate pool.")] = 16,
) -> None:
    """Best-of-n over-optimisation: single vs K-head (each diversity recipe) vs full ensemble, gold = VADER."""
    from training.overopt import Setup, run_experiment
    from training.overopt_report import write_results

    setup = Setup(
        seeds=list(range(2 if quick else seeds)), pool_size=256 if quick else pool_size, n_prompts=prompts
    )
    if quick:
        setup.n_pairs, setup.epochs = 1000, 2
    results = run_experiment(setup, out, log=typer.echo)
    flags = "--quick " if quick else f"--seeds {seeds} --pool-size {pool_size} --prompts {prompts} "
    results["command"] = f"hydra-rm experiment overopt {flags}--out {out}"
    paths = write_results(results, out, prefix="overopt-quick" if quick else "overopt")
    for p in paths:
        typer.echo(f"wrote {p}")


@experiment_app.command("novelty-shift")
def novelty_shift(
    out: Annotated[Path, typer.Option(help="Directory for novelty-shift.md and .json.")] = Path(
        "docs/experiments"
    ),
    train_pairs: Annotated[int, typer.Option(min=10)] = 400,
    val_pairs: Annotated[
        int, typer.Option(min=10, help="Validation pairs (lambda is chosen on them).")
    ] = 100,
    held_pairs: Annotated[int, typer.Option(min=10, help="Evaluation pairs.")] = 150,
    seed: Annotated[list[int], typer.Option(help="Data seed of a draw; repeat for several draws.")] = [11],  # noqa: B006
    epochs: Annotated[int, typer.Option(min=1)] = 1,
) -> None:
    """Shift AUROC of feature-space novelty u vs the heads' std on the real MiniLM (issue 21's table);
    lambda chosen per draw on a validation split, scored on a separate evaluation split."""
    from training.novelty_shift import run

    report = run(out, train_pairs=train_pairs, val_pairs=val_pairs, held_pairs=held_pairs, seeds=tuple(seed),
                 epochs=epochs, log=typer.echo)  # fmt: skip
    typer.echo((out / "novelty-shift.md").read_text())
    typer.echo(f"{report['meta']['seconds']} s")


@experiment_app.command("overopt-pretrained")
def overopt_pretrained(
    out: Annotated[Path, typer.Option(help="Directory for the table, PNG and raw JSON.")] = Path(
        "docs/experiments"
    ),
    quick: Annotated[bool, typer.Option(help="CI smoke test: 1 seed, tiny data and pools (~1 min).")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds (full run).")] = 10,
    first_seed: Annotated[int, typer.Option(help="Seeds first_seed .. first_seed+seeds-1.")] = 0,
    pool_size: Annotated[int, typer.Option(help="Candidates per prompt (power of 2).")] = 1024,
    prompts: Annotated[int, typer.Option(min=1, max=48, help="Prompts with an evaluation pool.")] = 8,
    pairs: Annotated[int, typer.Option(min=8, help="Training pairs (+10% reference).")] = 1000,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    methods: Annotated[str, typer.Option(help="Comma-separated: joint, shard, shard-blocks, ensemble.")] = (
        "joint,shard-blocks,ensemble"
    ),
    device: Annotated[str, typer.Option(help="cpu, cuda[:i] or auto (cuda when available).")] = "cpu",
    frozen_layers: Annotated[
        int | None, typer.Option(min=0, max=5, help="Lower layers cached frozen (0: all 6 trained).")
    ] = None,
    bias: Annotated[float, typer.Option(help="Labeller bias per appended tag (gold units); 0: none.")] = 0.0,
    gaming_share: Annotated[
        float, typer.Option(help="Pool share of heavily tagged items (with --bias).")
    ] = 0.0,
    noise: Annotated[float, typer.Option(min=0.0, max=0.5, help="Share of training labels flipped.")] = 0.25,
    prefix: Annotated[str | None, typer.Option(help="Output file stem (default by seeds).")] = None,
    lr_top: Annotated[float, typer.Option(help="Learning rate of the trained encoder layers.")] = 2e-4,
    lr_heads: Annotated[float, typer.Option(help="Learning rate of the heads.")] = 2e-3,
    pool_seed: Annotated[
        int, typer.Option(help="Evaluation pool seed (pilots: another one than the reported run's).")
    ] = 4242,
) -> None:
    """Best-of-n on the pretrained MiniLM trunk: single vs joint vs shard-blocks vs ensemble, with u."""
    from training.overopt_pretrained import RECIPES, PSetup, run_experiment
    from training.overopt_pretrained_report import preamble, write_results
    from training.toptrain import TrainHP

    names = [m.strip() for m in methods.split(",")]
    if bad := [m for m in names if m not in RECIPES]:
        raise _fail(f"--methods: unknown {', '.join(bad)}; expected some of {', '.join(RECIPES)}")
    if quick:
        setup = PSetup(
            seeds=[first_seed], methods=names, n_pairs=48, n_heldout=32, n_shift=8, pool_size=64, n_prompts=2,
            val_pool_size=32,
            val_prompts=2, frozen_layers=5 if frozen_layers is None else frozen_layers,
            hp=TrainHP(epochs=1, batch_size=16), exploit_share=0.05,
        )  # fmt: skip
    else:
        setup = PSetup(
            seeds=list(range(first_seed, first_seed + seeds)), methods=names, n_pairs=pairs,
            pool_size=pool_size, n_prompts=prompts, val_pool_size=pool_size // 2, val_prompts=4,
            hp=TrainHP(epochs=epochs, lr_top=lr_top, lr_heads=lr_heads),
        )  # fmt: skip
        if frozen_layers is not None:
            setup.frozen_layers = frozen_layers
    setup.device, setup.bias, setup.gaming_share, setup.noise = device, bias, gaming_share, noise
    setup.pool_seed = pool_seed
    extra = f"--device {device} " if device != "cpu" else ""
    extra += f"--frozen-layers {frozen_layers} " if frozen_layers is not None else ""
    extra += f"--bias {bias:g} --gaming-share {gaming_share:g} " if bias else ""
    extra += f"--noise {noise:g} " if noise != 0.25 else ""
    extra += f"--lr-top {lr_top:g} --lr-heads {lr_heads:g} " if (lr_top, lr_heads) != (2e-4, 2e-3) else ""
    extra += f"--pool-seed {pool_seed} " if pool_seed != 4242 else ""
    flags = (
        "--quick "
        if quick
        else (
            f"--seeds {seeds} --first-seed {first_seed} --pool-size {pool_size} --prompts {prompts} "
            f"--pairs {pairs} --epochs {epochs} "
        )
    )
    command = f"hydra-rm experiment overopt-pretrained {flags}{extra}--methods {','.join(names)} --out {out}"
    prefix = prefix or ("overopt-pretrained-quick" if quick else f"overopt-pretrained-s{first_seed}")

    def save(results: dict) -> None:
        results["command"] = command
        write_results(results, out, prefix, preamble(results) + f"\nCommand: `{command}`")

    results = run_experiment(setup, log=typer.echo, on_seed=save)
    save(results)
    typer.echo(f"wrote {out / prefix}.md/.png/.json")


@experiment_app.command("heads-pretrained")
def heads_pretrained(
    out: Annotated[Path, typer.Option(help="Directory for the table and raw JSON.")] = Path(
        "docs/experiments"
    ),
    seed: Annotated[int, typer.Option(help="Data and training seed (use one no earlier run used).")] = 2026,
    pairs: Annotated[int, typer.Option(min=8, help="Training pairs (+10% reference), clean labels.")] = 800,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda[:i] or auto (cuda when available).")] = "cpu",
    frozen_layers: Annotated[int, typer.Option(min=0, max=5, help="Lower layers cached frozen.")] = 4,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated recipes (default: the table's).")
    ] = None,
    lr_top: Annotated[float, typer.Option(help="Learning rate of the trained encoder layers.")] = 2e-4,
    lr_heads: Annotated[float, typer.Option(help="Learning rate of the heads.")] = 2e-3,
) -> None:
    """Issue 17's table on fresh data: each recipe's accuracy, head correlation and detection AUROCs."""
    import json as _json

    from training.overopt_pretrained import RECIPES, TABLE_METHODS, PSetup, heads_table
    from training.overopt_pretrained_report import heads_markdown
    from training.toptrain import TrainHP

    names = [m.strip() for m in methods.split(",")] if methods else list(TABLE_METHODS)
    if bad := [m for m in names if m not in RECIPES]:
        raise _fail(f"--methods: unknown {', '.join(bad)}; expected some of {', '.join(RECIPES)}")
    setup = PSetup(
        seeds=[seed], methods=names, n_pairs=pairs, noise=0.0,
        hp=TrainHP(epochs=epochs, lr_top=lr_top, lr_heads=lr_heads),
        frozen_layers=frozen_layers, device=device,
    )  # fmt: skip
    command = (
        f"hydra-rm experiment heads-pretrained --seed {seed} --pairs {pairs} --epochs {epochs} --out {out}"
        + (f" --device {device}" if device != "cpu" else "")
        + (f" --frozen-layers {frozen_layers}" if frozen_layers != 4 else "")
        + (f" --methods {','.join(names)}" if methods else "")
        + (f" --lr-top {lr_top:g} --lr-heads {lr_heads:g}" if (lr_top, lr_heads) != (2e-4, 2e-3) else "")
    )
    out.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        results["command"] = command
        (out / "heads-pretrained.json").write_text(_json.dumps(results, indent=1) + "\n")
        (out / "heads-pretrained.md").write_text(heads_markdown(results))

    save(heads_table(setup, log=typer.echo, on_method=save))
    typer.echo(f"wrote {out / 'heads-pretrained.md'}")


@experiment_app.command("toydata")
def toydata(
    out: Annotated[Path, typer.Option(help="JSONL of {prompt, chosen, rejected} to write.")],
    pairs: Annotated[int, typer.Option(min=1)] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
    noise: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of labels flipped.")] = 0.25,
) -> None:
    """The experiment's offline review preference pairs (gold = VADER), for training or eval."""
    from training.data import write_pairs
    from training.toydata import preference_rows

    write_pairs(out, preference_rows(pairs, seed, noise=noise))
    typer.echo(f"wrote {pairs} pairs to {out}")


app = typer.Typer(add_completion=False, no_args_is_help=True, help="hydra-rm training commands.")
app.command("train")(train)
app.command("eval")(eval_)
app.add_typer(experiment_app, name="experiment")


def run(args: list[str]) -> None:
    """Entry point for cli.main's lazy wrappers: `run(["train", "--data", ...])`."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load report for the new head
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=args, prog_name="hydra-rm", standalone_mode=True)
