"""The vLLM engine: decoder reward models too large for one device, scored by a managed vLLM server.

Same surface as `scoring.engine.ScoringEngine` (the engine interface), so the batcher, deadlines,
backpressure, drain, metrics and APIs are unchanged. How it is built (measured choices,
bench/results/vllm-engine-choice-cpu.md):

- vLLM runs as a **managed child process** (`scoring/vllm_child.py` under vLLM's own interpreter, in
  its own venv pinning its own torch/transformers) on a private loopback port with a random API key,
  started and health-checked before the server is ready, stopped with it, and killed with its whole
  process group if hydra-rm dies;
- hydra-rm tokenizes (ItemTokenizer: chat template, truncation policy, `reject`) and sends **token
  ids**, so there is one tokenization and truncation policy for both engines;
- vLLM's own classifier (`--runner pooling --convert classify`, no activation) returns the K raw
  logits; per-head normalisation is `scoring.heads.fold_normalization` folded into an identity head, and
  min/max/mean/std come from `kernels.multihead_reward`, as in the torch engine.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from kernels import multihead_reward
from model_store.errors import ModelStoreError
from model_store.manifest import RewardManifest, resolve_manifest
from model_store.tokenization import EncodedItem, ItemTokenizer
from scoring.base import PlannedEngine
from scoring.batching import BatchPolicy
from scoring.heads import fold_normalization, item_scores
from scoring.results import ItemScore

log = logging.getLogger("hydra_rm.vllm")

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("vllm_child.py")
SERVED_NAME = "rm"
# Measured on this CPU (issue 18): without these vLLM's CPU build pins its OpenMP threads to cores it
# reserves for its front end and the engine crawls on 2 cores. Set only when absent (ignored on GPU).
# VLLM_CPU_KVCACHE_SPACE: without it vLLM 0.32's CPU build reserves 92% of the machine's RAM
# (`--gpu-memory-utilization` means RAM there) and refuses to start unless that much is free, which a
# user's host sharing RAM with anything else never has (hit here at 17.8 of 23.5 GiB free).
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}


class VllmUnavailable(ModelStoreError):
    """The vLLM engine cannot run here (no vLLM interpreter, or an unsupported model)."""


def find_vllm_python(configured: Path | None) -> Path:
    """The interpreter of vLLM's venv: the setting, else `.venv-vllm` in the working directory or the
    repository (`make vllm-env` builds it there)."""
    candidates = [configured] if configured is not None else [Path(".venv-vllm"), ROOT / ".venv-vllm"]
    for c in candidates:
        py = c if c.is_file() else c / "bin" / "python"
        if py.is_file():
            return py.absolute()  # not resolve(): a venv's python is a symlink to the base interpreter
    where = configured or " or ".join(str(c) for c in candidates)
    raise VllmUnavailable(
        f"HYDRA_RM_ENGINE=vllm needs vLLM's interpreter, not found at {where}: build it with `make vllm-env` "
        "or set HYDRA_RM_VLLM_PYTHON to a python that can `import vllm`"
    )


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """vLLM's environment: the CPU defaults where the operator set nothing, and offline (the model is a
    local directory)."""
    return {**CPU_ENV_DEFAULTS, **environ, "HF_HUB_OFFLINE": "1"}


def api_key() -> str:
    """The child's random API key. Hex, never urlsafe base64: a key starting with `-` (1 start in 64)
    was read by vLLM's argument parser as an option, and the child failed to start (seen in the tests)."""
    return secrets.token_hex(24)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VllmOptions:
    """What hydra-rm passes to vLLM (HYDRA_RM_VLLM_* settings, scoring/settings.py)."""

    python: Path | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    prefix_caching: bool = True
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 900.0
    # Batches in flight at once (HYDRA_RM_VLLM_FORWARDS; 4 beat 2 on GRPO, peer-vllm-forwards-ab-cpu.md).
    forwards: int = 4
    allow_pickle: bool = False
    trust_remote_code: bool = False


class VllmChild:
    """A vLLM OpenAI-compatible server on a private loopback port, owned by this process."""

    def __init__(self, model_dir: Path, max_model_len: int, options: VllmOptions) -> None:
        self.python = find_vllm_python(options.python)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key()  # other local users cannot score through our child
        args = [
            "--model", str(model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key,
            "--runner", "pooling", "--convert", "classify",
            "--pooler-config", '{"use_activation": false}',
            "--max-model-len", str(max_model_len), "--dtype", vllm_dtype(options.dtype, self.python),
            "--tensor-parallel-size", str(options.tensor_parallel_size),
            "--pipeline-parallel-size", str(options.pipeline_parallel_size),
            "--enable-prefix-caching" if options.prefix_caching else "--no-enable-prefix-caching",
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if options.quantization:
            args += ["--quantization", options.quantization]
        if not options.allow_pickle:  # hydra-rm's rule: weights only from safetensors
            args += ["--load-format", "safetensors"]
        if options.trust_remote_code:
            args += ["--trust-remote-code"]
        self.cmd = [str(self.python), str(LAUNCHER), *args, *options.extra_args]
        env = child_env(os.environ)
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        log.info("starting vLLM: %s", " ".join(shlex.quote(c) for c in self.cmd).replace(self.api_key, "***"))
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the engine-core workers too
        )
        self._reader = threading.Thread(target=self._read_log, name="hydra-rm-vllm-log", daemon=True)
        self._reader.start()
        self._finalizer = weakref.finalize(self, _kill_group, self.proc)
        atexit.register(self._finalizer)
        try:
            self._wait_healthy(options.startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            log.debug("vllm: %s", line)

    def _wait_healthy(self, timeout_s: float) -> None:
        start = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                self._reader.join(2)
                raise VllmUnavailable(
                    f"vLLM exited with status {code} while starting:\n" + "\n".join(self.tail)
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    log.info("vLLM ready on %s in %.1f s", self.url, time.monotonic() - start)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout_s:
                raise VllmUnavailable(
                    f"vLLM did not become healthy in {timeout_s:g} s (HYDRA_RM_VLLM_STARTUP_TIMEOUT_S):\n"
                    + "\n".join(self.tail)
                )
            time.sleep(0.25)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the group (vLLM shuts its workers down), SIGKILL what is left after `timeout_s`."""
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop in %.0f s; killing it", timeout_s)
        self._finalizer()  # SIGKILL whatever of the group is left (engine-core workers), once
        atexit.unregister(self._finalizer)


def vllm_dtype(dtype: str, python: Path) -> str:
    """HYDRA_RM_DTYPE for vLLM. `auto` means what it means for the torch engine: float32 on a CPU
    (vLLM's CPU build would otherwise run an fp32 checkpoint in bf16: 2.5e-3 off HF's logits here,
    against 1e-5 in fp32), else vLLM's own choice from the checkpoint."""
    if dtype != "auto":
        return dtype
    cpu_build = any(python.parent.parent.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))
    return "float32" if cpu_build else "auto"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)
    except ProcessLookupError:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _is_decoder(model_dir: Path, manifest: RewardManifest, trust_remote_code: bool) -> str:
    """The architecture name, if the torch engine would pool it at the last token (a decoder head):
    the same decision (`scoring.heads.resolve_head`), on a weightless meta-device copy."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from scoring.heads import resolve_head

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    arch = type(model).__name__
    try:
        kind = resolve_head(model, manifest.pooling).kind
    except ModelStoreError as e:
        raise VllmUnavailable(f"HYDRA_RM_ENGINE=vllm: {e}") from e
    if kind != "last_token":
        raise VllmUnavailable(
            f"HYDRA_RM_ENGINE=vllm serves decoder reward models only (last-token pooling); {arch} pools "
            f"{kind.replace('_', ' ')} (manifest pooling={manifest.pooling}): use HYDRA_RM_ENGINE=torch"
        )
    return arch


class VllmEngine(PlannedEngine):
    """The engine interface over a managed vLLM server (thread-safe: forwards may overlap)."""

    # The batcher's queued-ahead batch is sent while the running one computes (service/runtime.py), so
    # vLLM's scheduler always holds the next batch instead of idling through each HTTP round trip.
    concurrent_forwards = 2
    # vLLM runs each sequence unpadded: /metrics counts a batch's real tokens, not a padded rectangle.
    pads_batches = False
    # u needs the pooled hidden state, which vLLM's classifier does not return (its embed runner refuses
    # a checkpoint with a score layer: bench/vllm_engine_choice.py). The service says so (scoring/interface.py).
    novelty = None
    novelty_unavailable = (
        "the vLLM engine returns vLLM's K logits, not the pooled hidden state u is computed on: "
        "serve with HYDRA_RM_ENGINE=torch for `novelty`"
    )

    def __init__(
        self,
        model_dir: Path,
        name: str,
        version: str,
        manifest: RewardManifest | None,
        *,
        options: VllmOptions | None = None,
        policy: BatchPolicy | None = None,
        max_length: int | None = None,
        truncation_side: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from model_store.loader import default_max_length

        options = options or VllmOptions()
        self.concurrent_forwards = options.forwards
        self.path = Path(model_dir)
        self.name, self.version = name, version
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=options.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=options.trust_remote_code)
        k = int(config.num_labels)
        defaults = {} if manifest is not None else {"max_length": default_max_length(config, self.tokenizer)}
        manifest = resolve_manifest(manifest, k, **defaults)  # as the torch loader and the store do
        if manifest.branches is not None:  # vLLM would serve every head from branch 0's features
            raise ModelStoreError(
                f"{self.path} has per-head branches ({manifest.branches.layers} layers), which vLLM cannot "
                "run: serve it with HYDRA_RM_ENGINE=torch"
            )
        self.manifest = manifest
        self.architecture = _is_decoder(self.path, manifest, options.trust_remote_code)
        self.model_type = getattr(config, "model_type", None)
        self.items = ItemTokenizer(
            self.tokenizer,
            manifest,
            max_length=max_length,
            truncation_side=truncation_side,
            model_max_length=getattr(config, "max_position_embeddings", None),
        )
        self.max_length = self.items.max_length
        self.truncation_side = self.items.truncation_side
        self.has_chat_template = self.items.has_chat_template
        # vLLM batches continuously and without padding, and its prefix cache shares prompts across
        # requests: hydra-rm's batches only bound one HTTP request, and are never cut for padding.
        self.policy = policy or vllm_policy()
        self.options = options
        # Normalisation, defined once (scoring.heads.fold_normalization), folded into an identity head over
        # vLLM's raw logits; the kernel then gives every head and min/max/mean/std as for torch.
        self.weight, self.bias = fold_normalization(torch.eye(k), None, manifest.normalization)
        self.child = VllmChild(self.path, self.max_length, options)
        self._client = httpx.Client(
            base_url=self.child.url,
            headers={"Authorization": f"Bearer {self.child.api_key}"},
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    # -- model facts -----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """The vLLM child still runs (/readyz reports `broken` otherwise)."""
        return self.child.alive

    def fingerprint(self) -> dict[str, Any]:
        """The weights and the settings that change rewards (scoring/interface.py)."""
        files: Any = self.manifest.files or sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.path.iterdir() if p.is_file()
        )
        norm = self.manifest.normalization
        return {
            "name": self.name,
            "version": self.version,
            "engine": "vllm",
            "files": files,
            "max_length": self.max_length,
            "truncation_side": self.truncation_side,
            "normalization": norm.model_dump() if norm else None,
            "dtype": self.options.dtype,
            "disagreement": self.manifest.disagreement.model_dump() if self.manifest.disagreement else None,
        }

    # -- scoring ---------------------------------------------------------------------------------
    def logits(self, batch: Sequence[EncodedItem]) -> torch.Tensor:
        """vLLM's K raw logits per item, `[B, K]` fp32, in batch order."""
        body = {"model": SERVED_NAME, "input": [list(e.input_ids) for e in batch], "use_activation": False}
        try:
            r = self._client.post("/classify", json=body)
        except httpx.HTTPError as e:
            state = "running" if self.child.alive else f"exited with status {self.child.proc.returncode}"
            raise RuntimeError(f"vLLM request failed ({type(e).__name__}: {e}); the child is {state}") from e
        if r.status_code != 200:
            raise RuntimeError(f"vLLM answered {r.status_code}: {r.text[:500]}")
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        out = torch.tensor([d["probs"] for d in data], dtype=torch.float32)
        if out.shape != (len(batch), self.num_heads):
            raise RuntimeError(f"vLLM returned logits of shape {tuple(out.shape)} for {len(batch)} items")
        return out

    def forward(self, batch: Sequence[EncodedItem]) -> list[ItemScore]:
        """Score one planned batch (one HTTP request; vLLM schedules its items), in batch order."""
        if not batch:
            return []
        return item_scores(multihead_reward(self.logits(batch), None, self.weight, self.bias), batch)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "num_heads": self.num_heads,
            "head_names": self.head_names,
            "encoder": self.model_type,
            "architecture": self.architecture,
            "pooling": "last_token",
            "max_length": self.max_length,
            "truncation_side": self.truncation_side,
            "chat_template": self.has_chat_template,
            "device": f"vllm (tp={self.options.tensor_parallel_size}, pp={self.options.pipeline_parallel_size})",
            "engine": "vllm",
        }

    def close(self) -> None:
        self._client.close()
        self.child.stop()


def vllm_policy(token_budget: int | None = None, max_batch_size: int = 64) -> BatchPolicy:
    """Batches for vLLM: bounded per HTTP request, never split for padding, no prefix planning."""
    return BatchPolicy(
        token_budget=token_budget or VLLM_TOKEN_BUDGET,
        max_batch_size=max_batch_size,
        max_padding=float("inf"),
        prefix_sharing=False,
    )


VLLM_TOKEN_BUDGET = 8192


def build_vllm_engine(settings: Any) -> VllmEngine:
    """`HYDRA_RM_ENGINE=vllm`: verify the checkpoint as the torch engine would, then start vLLM on it."""
    from model_store import ModelStore
    from model_store.loader import verified_source

    path, name, version, manifest = verified_source(
        settings.model,
        ModelStore(settings.store_root),
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
    )
    options = VllmOptions(
        python=settings.vllm_python,
        dtype=settings.dtype,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        pipeline_parallel_size=settings.vllm_pipeline_parallel_size,
        quantization=settings.vllm_quantization,
        prefix_caching=settings.prefix_sharing != "off",
        extra_args=shlex.split(settings.vllm_args),
        startup_timeout_s=settings.vllm_startup_timeout_s,
        forwards=settings.vllm_forwards,
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
    )
    return VllmEngine(
        path,
        name,
        version,
        manifest,
        options=options,
        policy=vllm_policy(settings.token_budget, settings.max_batch_size),
        max_length=settings.max_length,
        truncation_side=settings.truncation_side,
    )


def vllm_available(python: Path | None = None) -> bool:
    try:
        find_vllm_python(python)
    except VllmUnavailable:
        return False
    return True


__all__ = ["VllmChild", "VllmEngine", "VllmOptions", "VllmUnavailable", "build_vllm_engine", "vllm_available"]
