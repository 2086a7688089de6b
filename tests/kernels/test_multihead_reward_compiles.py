"""The kernel compiles for real CUDA targets, and every default launch config fits shared memory.

The interpreter runs the kernel's semantics but not the compiler: a construct the compiler rejects,
or a block config that needs more shared memory than the GPU has (which only fails at launch), would
pass every interpreter test. Triton can compile for a target without a GPU, so this checks both on
CPU, in a subprocess because this test process has TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mr = importlib.import_module("kernels.multihead_reward")

pytestmark = pytest.mark.skipif(not mr.triton_available(), reason="triton is not installed")

HERE = Path(__file__).resolve().parent
# (compute capability, SM count, opt-in shared memory per block): the tightest common inference GPU
# (A10/L4 class, 99 KiB) and the benchmark target (H100, 227 KiB).
TARGETS = {"sm86": (86, 72, 101376), "sm90": (90, 132, 232448)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _compile(jobs: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "aot_compile.py")],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if proc.returncode == 3:
        pytest.skip(f"this Triton cannot compile ahead of time here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _default_config_jobs() -> list[dict]:
    jobs = {}
    for (name, (arch, n_sm, smem)), k, b, (x, w) in itertools.product(
        TARGETS.items(), (16, 64, 256), (1, 200_000), [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")]
    ):
        cfg = mr.launch_config(b, 4096, k, x_dtype=DTYPES[x], w_dtype=DTYPES[w], n_sm=n_sm, smem_bytes=smem)
        key = (arch, x, w, tuple(sorted(cfg.items())))
        jobs[key] = {"arch": arch, "x": x, "w": w, "cfg": cfg, "limit": smem, "target": name}
    # Unspecialised strides, ragged H and the pooled layout compile too.
    cfg = mr.launch_config(3, 1000, 5, x_dtype=torch.float16)
    jobs["odd"] = {"arch": 80, "x": "fp16", "w": "fp16", "cfg": cfg, "limit": 166912, "target": "sm80"}
    jobs["odd"] |= {"specialise": False, "even_h": False, "has_index": False}
    return list(jobs.values())


def _novelty_jobs() -> list[dict]:
    """The kernel with the novelty loop compiled in, at the blocks `launch_config(novelty=True)` picks."""
    jobs = []
    for (name, (arch, n_sm, smem)), k, x in itertools.product(TARGETS.items(), (16, 256), ("bf16", "fp32")):
        cfg = mr.launch_config(
            200_000, 4096, k, x_dtype=DTYPES[x], w_dtype=DTYPES[x], n_sm=n_sm, smem_bytes=smem, novelty=True
        )
        block_r = cfg.pop("BLOCK_R")
        jobs.append({"arch": arch, "x": x, "w": x, "cfg": cfg, "limit": smem, "target": name,
                     "novelty": True, "resid": k == 16, "block_r": block_r})  # fmt: skip
    return jobs


def test_novelty_configs_compile_and_fit_shared_memory():
    jobs = _novelty_jobs()
    for job, res in zip(jobs, _compile(jobs), strict=True):
        assert res["shared"] <= job["limit"], (
            f"{job['target']} {job['x']} {job['cfg']}: needs {res['shared']} B"
        )


def test_default_configs_compile_and_fit_shared_memory():
    jobs = _default_config_jobs()
    results = _compile(jobs)
    for job, res in zip(jobs, results, strict=True):
        what = f"{job['target']} {job['x']}x{job['w']} {job['cfg']}"
        assert res["shared"] <= job["limit"], f"{what}: needs {res['shared']} B of shared memory"
        tensor_cores = job["x"] in ("bf16", "fp16") and job["w"] in ("bf16", "fp16")
        assert res["mma"] == tensor_cores, f"{what}: tensor cores used={res['mma']}"
        if job.get("specialise", True):
            assert res["vector_loads"], f"{what}: no vectorised/async loads"
