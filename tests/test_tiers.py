"""`make test` and `make test-slow` together run every test, each once: the tiers split the suite that a
plain `pytest` collects, by the marker expressions the Makefile passes (tests/conftest.py marks `slow`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _marker_expression(target: str) -> str:
    """The `-m` expression in the pytest line of a Makefile target's recipe."""
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, f"no {target} target in the Makefile"
    lines = [ln for ln in recipe.group(1).splitlines() if "$(PYTEST)" in ln]
    assert len(lines) == 1, f"{target} should run $(PYTEST) once: {lines}"
    match = re.search(r"""-m\s+("[^"]*"|'[^']*'|\S+)""", lines[0])
    assert match, f"{target}'s pytest line has no -m: {lines[0]}"
    return match.group(1).strip("'\"")


def _collect(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode in (0, 5), out.stdout[-3000:] + out.stderr[-3000:]  # 5: nothing collected
    return [ln for ln in out.stdout.splitlines() if "::" in ln]


def test_make_test_and_make_test_slow_partition_the_suite() -> None:
    every = _collect()
    fast = _collect("-m", _marker_expression("test"))
    slow = _collect("-m", _marker_expression("test-slow"))
    assert len(every) == len(set(every)) > 800
    assert set(fast).isdisjoint(slow)
    assert sorted(fast + slow) == sorted(every)
    assert 0 < len(slow) < len(fast)
