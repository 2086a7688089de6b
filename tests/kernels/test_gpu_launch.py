"""GPU-launch details the interpreter cannot exercise by running: the device a launch runs on, and
which arguments Triton specialises (a new specialisation is a compile in the middle of serving)."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mr = importlib.import_module("kernels.multihead_reward")

pytestmark = pytest.mark.skipif(not mr.triton_available(), reason="triton is not installed")


def test_launch_device_switches_to_the_tensors_cuda_device():
    ctx = mr._launch_device(torch.device("cuda:1"))  # constructing it touches no GPU
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert isinstance(mr._launch_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_under_the_inputs_device(monkeypatch):
    seen: list[torch.device] = []
    real = mr._launch_device

    def record(dev: torch.device) -> contextlib.AbstractContextManager:
        seen.append(dev)
        return real(dev)

    monkeypatch.setattr(mr, "_launch_device", record)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 32, generator=g)
    index = torch.tensor([4, 0, 2])
    w, b = torch.randn(4, 32, generator=g), torch.randn(4, generator=g)
    got = mr.multihead_reward_triton(hidden, index, w, b)
    ref = mr.multihead_reward_reference(hidden, index, w, b)
    assert seen == [hidden.device]
    torch.testing.assert_close(got.rewards, ref.rewards, atol=1e-5, rtol=1e-5)


def test_batch_and_length_are_not_specialised():
    # Decided when the compiled (not interpreted) kernel is decorated: ask a fresh process.
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = (
        "import importlib; k = importlib.import_module('kernels.multihead_reward')._multihead_reward_kernel; "
        "print(','.join(p.name for p in k.params if p.do_not_specialize))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().split(",") == ["B", "T"]
