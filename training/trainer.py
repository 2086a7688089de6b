"""The training loop: multi-head Bradley-Terry on accelerate, checkpoints, resume, then the manifest.

A plain loop wrapped by `accelerate.Accelerator` (device placement, mixed precision, gradient
accumulation, DDP), so `accelerate launch -m training ...` / `accelerate launch $(which hydra-rm) train`
runs on several GPUs with no project code for it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_store.manifest import HeadNormalization, RewardManifest
from model_store.novelty import DEFAULT_LAMBDA
from model_store.store import ModelStore
from model_store.tokenization import EncodedItem, Item, ItemError, ItemTokenizer
from model_store.uncertainty import fit_quantiles
from training.data import DataError, Pair, response_items
from training.diversity import decorrelation_penalty, feature_block_mask, head_weights
from training.evaluate import head_correlation
from training.loss import multihead_bt_loss
from training.model import Loaded, Mode, RewardForward, load_base, param_groups


@dataclass
class TrainConfig:
    heads: int = 3
    head_names: list[str] | None = None
    epochs: int = 1
    seed: int = 0
    lr_encoder: float = 2e-5
    lr_heads: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int | None = None
    mixed_precision: str = "no"  # no | bf16 | fp16
    mode: Mode = "finetune"
    lora_r: int = 8
    lora_alpha: int = 16
    diversity: str = "shard"
    feature_blocks: bool = False  # head k reads only its own block of the pooled features (diversity.py)
    decorrelation: float = 0.0  # weight of the heads' batch-correlation penalty (diversity.py)
    # Per-head top layers (model_store/branches.py): N > 0 own layers per head, 0 (the default) none.
    # Opt-in: on MiniLM they decorrelated the heads but did not improve best-of-n (docs/experiments).
    branch_layers: int = 0
    reference_fraction: float = 0.1
    head_init_std: float | None = None
    save_steps: int = 0  # also a checkpoint at every epoch end (when a checkpoint dir is given)
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps
    cpu: bool = False
    progress: bool = True
    # Feature-space novelty (model_store/novelty.py) fitted on the training responses; None: not written.
    novelty_lambda: float | None = DEFAULT_LAMBDA

    def names(self) -> list[str]:
        names = self.head_names or [f"head_{i}" for i in range(self.heads)]
        if len(names) != self.heads:
            raise ValueError(f"{len(names)} head names for {self.heads} heads")
        return names


@dataclass
class TrainResult:
    model: Any  # the trained HF model (LoRA merged), fp32, eval mode
    tokenizer: Any
    manifest: RewardManifest  # normalisation, disagreement quantiles and provenance filled in
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = True  # False when max_steps stopped the run early
    is_main_process: bool = True  # under `accelerate launch`, only the main process publishes
    novelty: Any = None  # model_store.novelty.NoveltyStat, written beside the weights when set
    branches: Any = None  # nn.ModuleList of heads 1..K-1's own layers, written beside the weights when set


def split_reference(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, reference) index split; the reference is never trained on."""
    if n < 2:
        raise ValueError("need at least 2 pairs: one to train on and one for the reference split")
    n_ref = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 99_991)).tolist()
    return sorted(perm[n_ref:]), sorted(perm[:n_ref])


def collate(rows: list[EncodedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: encoders pool position 0, decoders read the last real token from the mask."""
    t = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    has_types = rows[0].token_type_ids is not None
    types = torch.zeros((len(rows), t), dtype=torch.long) if has_types else None
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
        if types is not None and r.token_type_ids is not None:
            types[i, : len(r.token_type_ids)] = torch.tensor(r.token_type_ids)
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    return out


@torch.no_grad()
def raw_rewards(
    fwd: RewardForward, encoded: list[EncodedItem], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """[N, K] un-normalised fp32 logits, in input order (length-sorted batches for less padding)."""
    fwd.eval()
    device = next(fwd.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out = torch.empty(len(encoded), fwd.hf.config.num_labels)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        out[idx] = fwd(**batch).float().cpu()
    return out


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("hydra-rm", "torch", "transformers", "accelerate", "peft", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _latest_checkpoint(ckdir: Path) -> Path | None:
    cks = [p for p in ckdir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


@dataclass
class _Progress:
    """The loop's running state across epochs (a partial accumulation carries over an epoch's end):
    optimizer steps, their history, the running means since the last step, the progress bar."""

    step: int
    history: list[dict[str, float]]
    bar: Any = None
    loss: float = 0.0
    accuracy: float = 0.0
    n: int = 0

    def add(self, loss: float, accuracy: float) -> None:
        self.loss += loss
        self.accuracy += accuracy
        self.n += 1

    def stepped(self) -> None:
        """An optimizer step happened: record the means since the last one and start again."""
        self.step += 1
        self.history.append(
            {"step": self.step, "loss": self.loss / self.n, "accuracy": self.accuracy / self.n}
        )
        self.loss, self.accuracy, self.n = 0.0, 0.0, 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{self.history[-1]['loss']:.4f}", acc=f"{self.history[-1]['accuracy']:.3f}"
            )


class Trainer:
    """One training run; `run()` trains (resuming if asked) and returns the finished model + manifest."""

    def __init__(
        self,
        cfg: TrainConfig,
        pairs: list[Pair],
        base: str,
        store: ModelStore,
        *,
        reference: list[Pair] | None = None,
        checkpoint_dir: Path | None = None,
        data_sha256: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.base = base
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.data_sha256 = data_sha256
        self.loaded: Loaded = load_base(
            base, cfg.heads, store, head_names=cfg.names(), mode=cfg.mode, seed=cfg.seed,
            max_length=cfg.max_length, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
            head_init_std=cfg.head_init_std, branch_layers=cfg.branch_layers,
            feature_blocks=cfg.feature_blocks,
        )  # fmt: skip
        # Tokenized exactly as the engine tokenizes for scoring (the engine passes the same cap).
        self.tok = ItemTokenizer(
            self.loaded.tokenizer,
            self.loaded.manifest,
            model_max_length=getattr(self.loaded.model.config, "max_position_embeddings", None),
        )
        if reference is None:
            train_idx, ref_idx = split_reference(len(pairs), cfg.reference_fraction, cfg.seed)
            self.train_pairs = [pairs[i] for i in train_idx]
            self.ref_pairs = [pairs[i] for i in ref_idx]
        else:
            self.train_pairs, self.ref_pairs = list(pairs), list(reference)
        self.train_enc = [self._encode_pair(i, p) for i, p in enumerate(self.train_pairs)]
        self.weights = head_weights(cfg.diversity, len(self.train_pairs), cfg.heads, cfg.seed)
        self.weight_means = self.weights.mean(0)
        if (self.weight_means == 0).any():
            raise ValueError(f"diversity={cfg.diversity} left a head with no training pairs; add data")

    def _encode_pair(self, i: int, pair: Pair) -> tuple[EncodedItem, EncodedItem]:
        try:
            return self.tok.encode(Item(**pair.chosen)), self.tok.encode(Item(**pair.rejected))
        except ItemError as e:
            raise DataError(f"training pair {i}: {e} (field {getattr(e, 'field', 'item')})") from e

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        acc = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.cpu
        )
        set_seed(cfg.seed)
        fwd, opt = self._prepare(acc)
        n = len(self.train_pairs)
        steps_per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)
        total_steps = steps_per_epoch * cfg.epochs
        state = self._start_state(acc, resume)
        progress = _Progress(step=state["step"], history=state["history"])
        t0 = time.perf_counter()
        if cfg.progress and acc.is_local_main_process:
            from tqdm.auto import tqdm

            progress.bar = tqdm(
                total=total_steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True
            )
        stopped = False
        for epoch in range(state["epoch"], cfg.epochs):
            skip = state["batches_done"] if epoch == state["epoch"] else 0
            stopped = self._epoch(acc, fwd, opt, epoch, skip, progress)
            if stopped:
                break
            self._save(
                acc,
                {"epoch": epoch + 1, "batches_done": 0, "step": progress.step, "history": progress.history},
            )
        if progress.bar is not None:
            progress.bar.close()
        train_seconds = time.perf_counter() - t0
        acc.wait_for_everyone()
        fwd_plain: RewardForward = acc.unwrap_model(fwd)
        result = self._finish(fwd_plain, progress.history, train_seconds, finished=not stopped)
        result.is_main_process = acc.is_main_process
        return result

    def _prepare(self, acc: Any) -> tuple[Any, Any]:
        """The forward (heads masked to feature blocks if asked) and its AdamW, prepared by accelerate."""
        cfg = self.cfg
        fwd = RewardForward(self.loaded.model, self.loaded.branches)
        if cfg.feature_blocks and cfg.heads > 1:
            _mask_heads(self.loaded.model, cfg.seed)
        groups = param_groups(self.loaded.model, cfg.lr_encoder, cfg.lr_heads)
        if self.loaded.branches is not None:  # the heads' own layers learn at the encoder's rate
            groups.append({"params": list(self.loaded.branches.parameters()), "lr": cfg.lr_encoder})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        return acc.prepare(fwd, opt)

    def _start_state(self, acc: Any, resume: bool) -> dict[str, Any]:
        """Where the loop starts: the newest checkpoint's state when resuming, else the beginning."""
        if resume and self.checkpoint_dir is not None and (ck := _latest_checkpoint(self.checkpoint_dir)):
            acc.load_state(str(ck))
            return json.loads((ck / "trainer_state.json").read_text())
        return {"epoch": 0, "batches_done": 0, "step": 0, "history": []}

    def _epoch_loader(self, acc: Any, epoch: int, skip: int) -> Any:
        """This epoch's shuffled batches (a function of seed and epoch), less the `skip` already done."""
        cfg, n = self.cfg, len(self.train_pairs)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        batches = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        # Each dataset element is a whole batch of pair indices (so accelerate shards whole batches
        # across processes); resuming drops those already consumed by every process.
        return acc.prepare_data_loader(
            torch.utils.data.DataLoader(
                batches[skip * acc.num_processes :],
                batch_size=1,
                collate_fn=lambda xs: self._collate(xs[0]),
            )
        )

    def _epoch(self, acc: Any, fwd: Any, opt: Any, epoch: int, skip: int, progress: _Progress) -> bool:
        """One epoch from batch `skip`, checkpointing every save_steps; True when max_steps stopped it."""
        cfg = self.cfg
        dl = self._epoch_loader(acc, epoch, skip)
        fwd.train()
        for b, batch in enumerate(dl, start=skip):
            # Dropout draws depend on (seed, epoch, batch) alone: a resumed run repeats them exactly.
            torch.manual_seed(cfg.seed * 1_000_003 + epoch * 100_003 + b)
            with acc.accumulate(fwd):
                loss, pair_acc = self._step(fwd, batch)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            progress.add(loss.item(), pair_acc)
            if acc.sync_gradients:
                progress.stepped()
                at_max = cfg.max_steps is not None and progress.step >= cfg.max_steps
                if at_max or (cfg.save_steps and progress.step % cfg.save_steps == 0):
                    state = {"epoch": epoch, "batches_done": b + 1, "step": progress.step}
                    self._save(acc, {**state, "history": progress.history})
                if at_max:
                    return True
        return False

    def _collate(self, idxs: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.train_enc[i][0] for i in idxs] + [self.train_enc[i][1] for i in idxs]
        batch = collate(rows, self.tok.pad_id)
        batch["index"] = torch.tensor(idxs)
        return batch

    def _step(self, fwd: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        idx = batch.pop("index").cpu()
        logits = fwd(**batch).float()
        b = idx.shape[0]
        chosen, rejected = logits[:b], logits[b:]
        w = self.weights[idx].to(logits.device)
        loss = multihead_bt_loss(chosen, rejected, w, self.weight_means.to(logits.device))
        if self.cfg.decorrelation and logits.shape[1] > 1:
            loss = loss + self.cfg.decorrelation * decorrelation_penalty(logits)
        acc = (chosen > rejected).float().mean().item()
        return loss, acc

    def _save(self, acc: Any, state: dict[str, Any]) -> None:
        if self.checkpoint_dir is None:
            return
        ck = self.checkpoint_dir / f"checkpoint-{state['step']}"
        acc.save_state(str(ck))
        if acc.is_main_process:
            (ck / "trainer_state.json").write_text(json.dumps(state))
            for old in self.checkpoint_dir.glob("checkpoint-*"):  # keep the newest only: disk is finite
                if old != ck:
                    shutil.rmtree(old, ignore_errors=True)

    # -- after training: normalisation, disagreement quantiles, provenance ------------------------
    def _finish(
        self, fwd: RewardForward, history: list[dict[str, float]], seconds: float, finished: bool
    ) -> TrainResult:
        cfg = self.cfg
        if self.loaded.peft_model is not None:
            fwd.hf = self.loaded.peft_model.merge_and_unload()
        fwd = fwd.float().cpu() if cfg.cpu or not torch.cuda.is_available() else fwd.float()
        ref_items = [p.chosen for p in self.ref_pairs] + [p.rejected for p in self.ref_pairs]
        raw = raw_rewards(fwd, [self.tok.encode(Item(**it)) for it in ref_items], self.tok.pad_id)
        mean = raw.mean(0)
        std = raw.std(0, correction=0)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant head stays un-scaled
        z = (raw - mean) / std
        r = len(self.ref_pairs)
        margin = z[:r] - z[r:]
        metrics: dict[str, Any] = {
            "reference_pairs": r,
            "train_pairs": len(self.train_pairs),
            "steps": len(history),
            "final_loss": history[-1]["loss"] if history else None,
            "train_seconds": round(seconds, 3),
            "reference_accuracy_per_head": [round(x, 6) for x in (margin > 0).float().mean(0).tolist()],
            "reference_accuracy_min": float((margin.min(1).values > 0).float().mean()),
            "reference_accuracy_mean": float((margin.mean(1) > 0).float().mean()),
        }
        disagreement = None
        if cfg.heads > 1:
            metrics["reference_head_correlation"] = head_correlation(z)[0]
            disagreement = fit_quantiles(z.std(1, correction=0).tolist())
        manifest = self.loaded.manifest.model_copy(
            update={
                "normalization": HeadNormalization(mean=mean.tolist(), std=std.tolist()),
                "disagreement": disagreement,
                "provenance": {
                    "trainer": "hydra-rm train",
                    "base": self.base,
                    "data_sha256": self.data_sha256,
                    "args": asdict(cfg),
                    "seed": cfg.seed,
                    "libraries": _library_versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "metrics": metrics,
                },
                "description": f"hydra-rm K={cfg.heads} Bradley-Terry heads ({cfg.diversity}) on {self.base}",
            }
        )
        model = fwd.hf
        model.eval()
        branches = fwd.branches.eval() if fwd.branches is not None else None
        stat = None
        if cfg.novelty_lambda is not None:
            from training.calibrate import novelty_for_training

            stat, info = novelty_for_training(
                model, self.loaded.tokenizer, manifest, response_items(self.train_pairs), [Item(**it) for it in ref_items],
                cfg.novelty_lambda, branches=branches,
            )  # fmt: skip
            manifest = manifest.model_copy(update={"novelty": info})
        return TrainResult(
            model,
            self.loaded.tokenizer,
            manifest,
            metrics,
            history,
            finished,
            novelty=stat,
            branches=branches,
        )


def _mask_heads(model: Any, seed: int) -> None:
    """Zero each head's weights outside its feature block and keep them zero (gradient hook): the
    served format stays one K-way linear head."""
    from training.model import head_linear

    lin = head_linear(model)
    mask = feature_block_mask(lin.out_features, lin.in_features, seed).to(lin.weight.device)
    with torch.no_grad():
        lin.weight.mul_(mask)
    lin.weight.register_hook(lambda g: g * mask)


def save_model(result: TrainResult, dest: Path) -> Path:
    """A plain HF sequence-classification checkpoint (safetensors) + tokenizer + manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(dest, safe_serialization=True)
    result.tokenizer.save_pretrained(dest)
    if result.novelty is not None:
        from model_store.novelty import save_novelty

        save_novelty(result.novelty, dest)
    if result.branches is not None:
        from model_store.branches import save_branches

        save_branches(result.branches, dest)
    result.manifest.write(dest)
    return dest


def publish(result: TrainResult, store: ModelStore, name: str, version: str | None = None) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hydra-train-") as tmp:
        save_model(result, Path(tmp))
        return store.publish(tmp, name, version, manifest=result.manifest)
