"""All configuration in one place: environment variables with prefix `HYDRA_RM_` (README lists each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_store_root() -> Path:
    return Path("~/.cache/hydra-rm/models").expanduser()


class Settings(BaseSettings):
    """Every field is documented because the README table is generated from these descriptions."""

    model_config = SettingsConfigDict(env_prefix="HYDRA_RM_", extra="ignore")

    # -- model -------------------------------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="Model to serve: store name (`name` or `name:version`), local directory, or hub id "
        "(`org/name`). Empty: the embedded default model.",
    )
    models: str | None = Field(
        default=None,
        description="Several models in one server: comma-separated specs as for `HYDRA_RM_MODEL` (e.g. "
        "`helpful:v3,safety:v1`); the first is the default. Requests choose one by `model` "
        "(`/v1/score`) or by path (`/models/{name}/get_reward`); each model has its own queue and "
        "engine, and its metrics carry its name. Overrides `HYDRA_RM_MODEL`.",
    )
    store_root: Path = Field(
        default_factory=default_store_root, description="Root directory of the model store."
    )
    allow_pickle: bool = Field(
        default=False, description="Allow pickled (.bin) weights. Only for trusted models."
    )
    trust_remote_code: bool = Field(default=False, description="Allow a model's custom Python code to run.")
    device: str = Field(
        default="auto", description="`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Encoder dtype; `auto` is bfloat16 on CUDA and float32 on CPU."
    )
    max_length: int | None = Field(
        default=None, ge=8, description="Max tokens per item (default: the manifest's)."
    )
    truncation_side: Literal["left", "right", "reject"] | None = Field(
        default=None,
        description="Over-long items: `left` cuts the prompt start and keeps the response end, `right` cuts "
        "the end, `reject` answers 422. Default: the manifest's (usually `left`).",
    )
    padding_side: Literal["right", "left"] = Field(
        default="right", description="Padding side for decoder models (encoders are always right-padded)."
    )
    cpu_packed_linear: bool = Field(
        default=False,
        description="On CPU in float32, run the encoder's linear layers through oneDNN with weights "
        "prepacked once at load (one more copy of those weights in memory). Measured in the engine: "
        "1.04-1.08x on distinct items, 0.93-0.95x on GRPO groups (bench/results/cpu-gemm-ab-cpu.md), "
        "so off by default: aten's linear, as in the Hugging Face forward.",
    )

    # -- engine ------------------------------------------------------------------------------------
    engine: Literal["torch", "vllm"] = Field(
        default="torch",
        description="`torch`: the model runs in this process on one device (any supported reward model). "
        "`vllm`: decoder reward models only (last-token pooling), run by a managed vLLM server on a "
        "private loopback port (tensor/pipeline parallel, continuous batching, prefix caching, "
        "quantisation); hydra-rm keeps tokenizing, the heads' normalisation and aggregation, the APIs and "
        "the metrics. Needs vLLM's own venv (`make vllm-env`).",
    )
    vllm_python: Path | None = Field(
        default=None,
        description="Interpreter of vLLM's venv. Default: `.venv-vllm/bin/python` in the working directory, "
        "else in the repository.",
    )
    vllm_tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM `--tensor-parallel-size`: GPUs one model is sharded over."
    )
    vllm_pipeline_parallel_size: int = Field(
        default=1, ge=1, description="vLLM `--pipeline-parallel-size`: pipeline stages (nodes, with Ray)."
    )
    vllm_quantization: str | None = Field(
        default=None,
        description="vLLM `--quantization` (e.g. `fp8`). Default: none (the dtype is `HYDRA_RM_DTYPE`).",
    )
    vllm_args: str = Field(
        default="",
        description="Further vLLM engine arguments, shell-quoted, appended as given (e.g. "
        "`--gpu-memory-utilization 0.85 --max-num-batched-tokens 16384`). Prefix caching follows "
        "`HYDRA_RM_PREFIX_SHARING`; the model, port, task and max length are hydra-rm's.",
    )
    vllm_forwards: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Batches hydra-rm keeps in flight to vLLM at once (vLLM schedules their items together; "
        "more keeps its continuous batching fed, fewer keeps each batch's latency down; 4 measured 1.11x "
        "the items/s of 2 on GRPO groups, bench/results/peer-vllm-forwards-ab-cpu.md).",
    )
    vllm_startup_timeout_s: float = Field(
        default=900.0,
        gt=0.0,
        description="How long vLLM may take to load and compile before startup fails (measured on this "
        "2-core CPU: 29-45 s for a small model).",
    )

    # -- batching ----------------------------------------------------------------------------------
    token_budget: int | None = Field(
        default=None,
        ge=64,
        description="Max padded tokens per encoder batch. Default 2048 on CPU (bench/results/engine-cpu.md: 1-2k best, 16k loses 12%), "
        "65536 on CUDA.",
    )
    max_batch_size: int = Field(default=64, ge=1, description="Max items per encoder batch.")
    max_padding: float | None = Field(
        default=None,
        ge=0.0,
        description="Most padding a service batch may carry, as a share of its real tokens (batches are "
        "split beyond it). Default 0.1 on CPU, where compute is linear in padded tokens (measured: "
        "padding 8 random-length items together costs 40%), 0.25 on CUDA, where a 7-8B model is compute-bound "
        "past ~300 tokens per batch (the arithmetic is at GPU_MAX_PADDING in scoring/batching.py).",
    )
    prefix_sharing: Literal["auto", "off"] = Field(
        default="auto",
        description="`auto`: items in a batch window whose token ids share a leading run of >= 32 tokens "
        "(a GRPO group's prompt) have it encoded once and each response scored against its cached "
        "keys/values, on causal decoders that pass a self-check (never encoders); exact duplicates are "
        "scored once for every model. Rewards do not change (tested to 1e-5 in fp32). Measured 2.5-3x "
        "on a GRPO-shaped workload (bench/results/prefix-cpu.md). `off`: every item encoded in full.",
    )
    torch_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Torch intra-op threads, set once per process where the engine is built. `auto`: "
        "torch's own count (OMP_NUM_THREADS if set, else the cores the process may use). Measured on "
        "2 cores (bench/results/threads-cpu.md): the service at 32 clients with 2 threads 57.8 items/s "
        "vs 37.8 with 1 on a quiet machine (1.53x), 34.1 vs 36.5 beside a process spinning one core "
        "(0.93x), so `auto` stays the default; the batch job 66.3 vs 38.1 quiet but 20.9 vs 36.8 busy: "
        "on a shared host set it to the cores left free (e.g. 1).",
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=60_000.0,
        description="Longest a part-full batch waits for requests already being received (never for "
        "requests that have not arrived; under load batches fill while the previous one runs).",
    )
    max_queue_items: int = Field(
        default=16384,
        ge=1,
        description="Items accepted but not yet scored, across all requests; beyond it requests get 503. "
        "Sized for a whole PPO rollout burst (OpenRLHF sends one request per sample).",
    )
    max_queue_tokens: int = Field(
        default=8_388_608,
        ge=1,
        description="Tokens accepted but not yet scored; beyond it requests get 503 with Retry-After.",
    )

    # -- HTTP service ------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address `hydra-rm serve` binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `hydra-rm serve` listens on.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; when set, scoring and model routes need "
        "`Authorization: Bearer <key>` (health and metrics stay open). Empty: no auth.",
    )
    aggregation: str | None = Field(
        default=None,
        description="Aggregation for `/get_reward` and the `/v1/score` default: `min`, `mean`, `max`, "
        "`uwo`, `lcb` (models with a novelty statistic), `stdp` (models with disagreement quantiles) or `head:<i>`. Default: the manifest's (usually `min`).",
    )
    uwo_lambda: float | None = Field(
        default=None, ge=0.0, description="Lambda for `uwo` (mean - lambda * var). Default: the manifest's."
    )
    lcb_beta: float = Field(
        default=1.0,
        ge=0.0,
        description="Beta for `lcb` (mean - beta * reward_std * novelty / reference median novelty).",
    )
    stdp_beta: float = Field(
        default=1.0,
        ge=0.0,
        description="Beta for `stdp` (mean - beta * reward_std * head std / reference median head std).",
    )
    max_items_per_request: int = Field(
        default=1024, ge=1, description="Most items one request may carry (422 beyond)."
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    request_timeout_s: float = Field(
        default=150.0,
        gt=0.0,
        description="Per-request deadline from arrival; past it the request gets 504 and its queued items "
        "are dropped. Below OpenRLHF's 180 s client timeout so workers get an answer, not a reset.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="Longest a client may take to send a request body, from arrival; past it the request "
        "gets 408 and the connection is closed (a trickling upload cannot hold a connection forever).",
    )
    head_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="Longest a client may take to send a request head (request line and headers), from "
        "connecting or from the first byte of a later request on a kept-alive connection; past it the "
        "client gets 408 and the connection is closed (an idle or header-trickling socket cannot hold a "
        "connection forever; uvicorn has no such timeout).",
    )
    max_connections: int = Field(
        default=8192,
        ge=1,
        description="Connections served at once: a connection takes a slot with its first request head "
        "and keeps it until it closes; a request on a connection beyond the limit gets 503 `overloaded` "
        "with Retry-After and a closed connection (a backstop against slow clients; sockets that have "
        "not sent a head hold no slot; the item queue is the normal overload signal). Keep the "
        "process's open-file limit above it.",
    )
    retry_after_s: int = Field(default=1, ge=0, description="`Retry-After` seconds sent with 503s.")
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0.0,
        description="On SIGTERM: how long to keep serving in-flight and queued requests before exiting.",
    )
    access_log: bool = Field(
        default=False, description="Log every request (costly at thousands of requests per second)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Server log level."
    )
    docs: Literal["public", "auth", "off"] | None = Field(
        default=None,
        description="`/docs`, `/redoc` and `/openapi.json` (they show the head indices and item limits): "
        "`public`, `auth` (they need an API key, like the scoring routes) or `off` (404). Default: `auth` "
        "when `HYDRA_RM_API_KEYS` is set (a server that asks for keys does not describe itself to "
        "strangers; tools such as schemathesis can send the key), else `public`.",
    )

    playground: Literal["public", "auth", "off"] = Field(
        default="public",
        description="`/playground`, a page to score candidate responses by hand and see every head: "
        "`public` (it holds no server data; with `HYDRA_RM_API_KEYS` set it asks for a key and sends it "
        "as `Authorization: Bearer` with each call), `auth` (the page itself needs the key too, for a "
        "proxy that adds the header; a bare browser gets 401) or `off` (404).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):  # HYDRA_RM_API_KEYS="k1,k2"; empty means no auth
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.model == "":
            self.model = None
        if self.docs == "auth" and not self.api_keys:
            raise ValueError("docs=auth needs API keys (HYDRA_RM_API_KEYS); use public or off without them")
        if self.playground == "auth" and not self.api_keys:
            raise ValueError(
                "playground=auth needs API keys (HYDRA_RM_API_KEYS); use public or off without them"
            )
        return self

    def model_specs(self) -> list[str | None]:
        """The models to serve, the default first (`None`: the embedded default model)."""
        if self.models:
            specs = [m.strip() for m in self.models.split(",") if m.strip()]
            if specs:
                return list(specs)
        return [self.model]

    def for_model(self, spec: str | None) -> Settings:
        """These settings serving one of `model_specs()` (what build_engine loads)."""
        return self.model_copy(update={"model": spec, "models": None})

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self):  # noqa: ANN201 - torch.dtype, imported lazily
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)

    def resolved_aggregation(self, engine):  # noqa: ANN001, ANN201 - scoring.interface.Engine -> Aggregation
        """HYDRA_RM_AGGREGATION / HYDRA_RM_UWO_LAMBDA (or the CLI options that override them) over the
        manifest's defaults, for what `engine` computes: `serve`, `score` and `demo` all resolve here."""
        from model_store.manifest import resolve_aggregation
        from scoring.interface import require_served

        try:
            return require_served(
                resolve_aggregation(
                    engine.manifest, self.aggregation, self.uwo_lambda, self.lcb_beta, self.stdp_beta
                ),
                engine,
            )
        except ValueError as e:
            raise ValueError(f"aggregation setting: {e}") from e

    def batch_policy(self):  # noqa: ANN201 - scoring.batching.BatchPolicy
        """Token budget, batch size and padding cap for this device: what the service's batcher and
        the JSONL job both batch by (defaults in scoring/batching.py)."""
        from scoring.batching import BatchPolicy

        return BatchPolicy.resolve(
            self.resolved_device(),
            token_budget=self.token_budget,
            max_batch_size=self.max_batch_size,
            max_padding=self.max_padding,
            prefix_sharing=self.prefix_sharing != "off",
        )

    def resolved_docs(self) -> Literal["public", "auth", "off"]:
        if self.docs is not None:
            return self.docs
        return "auth" if self.api_keys else "public"


def apply_torch_threads(settings: Settings) -> int:
    """Set torch's intra-op threads once per process, before the first forward; returns the count.

    `auto` leaves torch's own choice alone: OMP_NUM_THREADS when set (Ray sets it per actor, and
    jobs/ray_job.py sets the actor's count before building its engine), else the cores this
    process may run on (torch honours taskset/affinity: `taskset -c 0` gives 1 here). Applied where
    the engine is built, not per request: torch keeps one process-wide value that each thread reads
    on its first parallel op, and the batcher's forward thread starts after the engine is built
    (tests/service/test_threads.py checks it inside that thread).
    """
    import torch

    if settings.torch_threads != "auto" and torch.get_num_threads() != settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return torch.get_num_threads()


def ray_gpus(num_gpus: float | None) -> float:
    """GPUs per Ray actor or Serve replica: as given, else one wherever the connected cluster has GPUs
    (the Ray twin of `device=auto`); `score-ray` and `serve-ray` both decide here."""
    if num_gpus is not None:
        return num_gpus
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0.0) > 0 else 0.0


def build_engine(settings: Settings):  # noqa: ANN201 - returns scoring.engine.ScoringEngine
    """Load the configured model into an engine (shared by `serve` and `score`)."""
    from model_store import ModelStore
    from model_store.loader import load_reward_model
    from scoring.engine import ScoringEngine

    if settings.engine == "vllm":
        from scoring.vllm_engine import build_vllm_engine

        return build_vllm_engine(settings)
    apply_torch_threads(settings)
    rm = load_reward_model(
        settings.model,
        ModelStore(settings.store_root),
        allow_pickle=settings.allow_pickle,
        trust_remote_code=settings.trust_remote_code,
        device=settings.resolved_device(),
        dtype=settings.resolved_dtype(),
    )
    return ScoringEngine(
        rm,
        policy=settings.batch_policy(),
        padding_side=settings.padding_side,
        max_length=settings.max_length,
        truncation_side=settings.truncation_side,
        cpu_packed_linear=settings.cpu_packed_linear,
    )
