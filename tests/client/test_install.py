"""The client installs and imports without the server's heavy dependencies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Blocked in the child: importing any of these raises ImportError (sys.modules[name] = None).
HEAVY = ["torch", "transformers", "triton", "tokenizers", "numpy", "pydantic", "fastapi"]
HEAVY += ["service", "scoring", "jobs", "cli"]  # the server's packages


def test_client_and_adapters_import_without_torch_or_server() -> None:
    code = (
        "import sys\n"
        f"for name in {HEAVY!r}: sys.modules[name] = None\n"
        "import client, client.trl, client.verl\n"
        "from client import HydraClient, AsyncHydraClient\n"
        "from client.trl import HydraReward, reward\n"
        "from client.verl import compute_score, compute_score_async, compute_score_batch\n"
        "import pickle; pickle.loads(pickle.dumps(HydraReward('http://127.0.0.1:1')))\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} and sys.modules[m] is not None)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_client_distribution_requires_only_httpx(tmp_path: Path) -> None:
    """Build client/pyproject.toml's wheel from a copy (so the source tree stays clean)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "client", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    code = (
        "import sys; from setuptools import build_meta\n"
        f"print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))\n"
    )
    (tmp_path / "dist").mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    requires = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    assert requires == ["httpx>=0.27"]
    assert {"client/__init__.py", "client/_client.py", "client/trl.py", "client/verl.py"} <= names
    assert not any(n.startswith(("service/", "kernels/", "model_store/", "training/")) for n in names)
