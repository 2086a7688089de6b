"""One local Ray cluster for the Ray tests (start ~5 s), started by the tests themselves.

`RAY_AUTH_MODE=disabled` keeps Ray from writing a token under the home folder; usage stats are off;
every start is time-limited because a Ray start that cannot finish can otherwise hang for minutes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ray = pytest.importorskip("ray")


@contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    with time_limit(120, "starting a local Ray cluster"):
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        yield
    finally:
        try:
            from ray import serve

            with time_limit(60, "stopping Serve"):
                serve.shutdown()
        finally:
            with time_limit(60, "stopping Ray"):
                ray.shutdown()
