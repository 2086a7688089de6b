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

# The slow tier: `make test` skips these (-m "not slow") to fit in two minutes here, `make test-slow`
# runs exactly these, and `.ci/run` runs both (tests/test_tiers.py checks the two tiers partition the
# suite). Each runs a whole program or cluster for 5-30 s: the bench scripts end to end, a real
# `hydra-rm serve` killed, drained or started from nothing, schemathesis's generated requests, MiniLM
# training. Every test that uses the Ray cluster is slow too (SLOW_FIXTURES): the cluster takes 5-20 s.
SLOW = (
    "tests/test_tiers.py",
    "tests/bench/test_peer_vllm.py",
    "tests/bench/test_ceiling_bench.py",
    "tests/bench/test_gpu_e2e.py::test_gpu_e2e_small_runs_and_writes_its_table",
    "tests/client/test_failover.py::test_server_killed_and_restarted_mid_run_loses_and_duplicates_nothing",
    "tests/service/test_server.py::test_sigterm_drains_in_flight_requests_then_exits_cleanly",
    "tests/service/test_server.py::test_serve_with_no_model_serves_the_embedded_default",
    "tests/service/test_schema.py",
    # Two vLLM starts of 30-60 s each; they skip without .venv-vllm, and `make test-vllm` runs them.
    "tests/scoring/test_vllm_engine.py",
    "tests/training/test_toptrain.py::test_feature_block_heads_on_minilm_correlate_below_joint",
    "tests/training/test_branch_train.py::test_branched_heads_on_minilm_correlate_below_joint",
    # The pretrained experiment end to end on MiniLM (13 s and 6 s of MiniLM training).
    "tests/training/test_overopt_pretrained.py::test_full_finetune_with_bias_and_branches_runs_tiny",
    "tests/training/test_overopt_pretrained.py::test_quick_run_writes_every_table",
    # Refits the default's novelty statistic from its 8,800 recipe responses (~15 s).
    "tests/training/test_default_model.py::test_default_carries_the_novelty_statistic_fitted_on_its_own_data",
)
SLOW_FIXTURES = {"ray_cluster"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the slow tier (`make test-slow`; `make test` skips it)")
    config.pluginmanager.register(_GroupIds(), "hydra-xdist-group-ids")


class _GroupIds:
    """pytest-xdist 3.8 groups a test by appending `@group` to `item._nodeid`, which pytest 9 no longer
    reads (it keeps the id in `item._id`): `--dist loadgroup` then spread every group over both workers
    (two Ray clusters, two Prometheus runs). On an xdist worker this puts the suffix where pytest reads
    it, after xdist's own hook, and only where it is missing, so a fixed xdist makes it a no-op."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not getattr(config.option, "loadgroup", False):
            return
        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})  # fmt: skip
            suffix = "@" + "_".join(names)
            if names and not item.nodeid.endswith(suffix):
                item._id = type(item._id).parse(item.nodeid + suffix)  # type: ignore[attr-defined]


def _module_scoped(item: pytest.Item) -> bool:
    """Whether the test uses a fixture built once per module (a server, a trained model, Prometheus)."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(fdefs and fdefs[-1].scope in ("module", "class") for fdefs in defs.values())


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parents[1]
    for item in items:
        rel = Path(item.fspath).resolve().relative_to(root).as_posix()
        nodeid = rel + item.nodeid[len(item.nodeid.split("::")[0]) :]
        if nodeid.startswith(SLOW) or SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        group = next((g for prefix, g in _GROUPS.items() if rel.startswith(prefix)), None)
        # A module fixture would be built once on each worker if the module's tests were spread over
        # both (Prometheus's scrapes 11 s, a trained model 6 s): such tests stay on one worker.
        if group is None and _module_scoped(item):
            group = rel.removeprefix("tests/").removesuffix(".py")
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
