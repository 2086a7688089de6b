"""Shared fixtures. The environment is fixed before anything imports triton or transformers."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run in the interpreter on CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.builders import build_tiny_bert, build_tiny_llama  # noqa: E402

# One intra-op thread: the test models are tiny, and beside a busy core 2 threads lose to 1 (the batch
# job 1.76x slower, bench/results/threads-cpu.md; one small forward 0.64 s vs 0.03 s, measured earlier).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def store(tmp_path: Path):
    from model_store import ModelStore

    return ModelStore(tmp_path / "store")


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A ScoringEngine over the tiny Llama; session-scoped because loading is the slow part."""
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.batching import BatchPolicy
    from scoring.engine import ScoringEngine

    rm = load_reward_model(str(tiny_llama_dir), ModelStore(tmp_path_factory.mktemp("store")))
    return ScoringEngine(rm, policy=BatchPolicy.resolve("cpu", token_budget=2048, max_batch_size=32))


# `make test` runs the suite on two pytest-xdist workers with `--dist loadgroup`: tests in one group
# run on one worker, one after another. Ray's tests share one local cluster (a second would start per
# worker); the tests that start servers or time a drain, a failover or a thread count compete for the
# same two cores, so they run one at a time and the other worker takes the light tests.
_GROUPS = {
    "tests/ray/": "ray",
    "tests/service/test_server.py": "processes",
    "tests/client/test_failover.py": "processes",
    "tests/service/test_threads.py": "processes",
    "tests/service/test_torch_thread.py": "processes",
    "tests/bench/": "processes",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parents[1]
    for item in items:
        rel = Path(item.fspath).resolve().relative_to(root).as_posix()
        for prefix, group in _GROUPS.items():
            if rel.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
                break
