"""GPU capacity planner: size each model version's GPU share and pack every replica.

A pure function of the cluster config and a GPU type (``autoscaling.gpus``). For each model
version on a GPU engine it works out the memory one replica needs on each of its GPUs:

- weights: parameters x bytes per parameter (from the quantization or dtype), split over
  the tensor-parallel GPUs;
- KV cache: 2 (K and V) x layers x KV heads x head size x bytes, for ``max_model_len``
  tokens of each of the ``max_num_seqs`` sequences the engine runs at once (the worst case:
  every running sequence at full length, so that no request is preempted), split likewise;
- overhead: CUDA context, activations and CUDA graphs, a flat allowance per GPU.

From that it picks the engine's memory fraction (vLLM ``gpu_memory_utilization``, SGLang
``mem_fraction_static``: a share of the whole GPU's memory) and the Ray GPU fraction
(``num_gpus``) on a 0.05 grid at or above it plus the process's CUDA context, so that the
two agree: replicas that Ray packs onto one GPU then also fit in its memory. Every replica up to ``max_replicas`` is packed
first-fit decreasing onto pods of the GPU type; replicas on whole GPUs take whole GPUs of one
pod. CPU-only deployments (gateway, router, an API frontier) are packed onto a CPU worker
group, since the head node runs none (``num-cpus: 0``).

``as_configured=True`` packs the fractions the config already holds (the renderer uses that:
the manifests must run what the config says) and warns where they are too small.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from autoscaling.gpus import DEFAULT_GPU, GPUType, gpu_type as find_gpu
from cluster.config import ClusterConfig, ModelShapeConfig, ModelVersionConfig, ResourcesConfig
from cluster.types import deployment_name

GIB = 1024**3
FRACTION_STEP = 0.05
MEMORY_STEP = 0.01
OVERHEAD_GIB = 1.5
# Each engine process also holds a CUDA context outside its memory fraction (vLLM checks the
# free memory against its own fraction after its context exists), so the Ray fraction leaves
# this much room above the engine's share: replicas packed onto one GPU then all start.
CUDA_CONTEXT_GIB = 0.5
# vLLM's own default is 0.9: the rest of the GPU is for the CUDA context of other processes
# and for fragmentation. The planner lets one engine take at most this share of a GPU.
MAX_ENGINE_FRACTION = 0.95
CPU_POD_CPUS = 8
HOST_GIB_PER_CPU = 4
MIN_POD_GIB = 16
_EPS = 1e-9


@dataclass(frozen=True)
class MemoryNeed:
    """What one replica needs on each of its GPUs, in GiB."""

    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    gpus: int
    kv_sequences: int
    kv_tokens_per_sequence: int

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.overhead_gib


@dataclass(frozen=True)
class Sizing:
    deployment: str
    engine: str
    num_cpus: float
    min_replicas: int
    max_replicas: int
    configured_num_gpus: float
    num_gpus: float
    configured_engine_memory_fraction: float | None
    engine_memory_fraction: float | None
    need: MemoryNeed | None


@dataclass(frozen=True)
class Placement:
    deployment: str
    replica: int
    num_gpus: float
    engine_memory_fraction: float | None
    gpu_memory_gib: float
    worker_group: str
    gpu_index: int


@dataclass(frozen=True)
class Unplaced:
    deployment: str
    reason: str


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    gpu_type: str | None
    gpus_per_pod: int
    cpus_per_pod: int
    memory_gib_per_pod: int
    min_pods: int
    max_pods: int


@dataclass(frozen=True)
class Plan:
    gpu_type: str
    gpu_memory_gib: float
    usd_per_gpu_hour: float
    sizings: tuple[Sizing, ...]
    placements: tuple[Placement, ...]
    unplaced: tuple[Unplaced, ...]
    worker_groups: tuple[WorkerGroup, ...]
    gpus_needed: int
    gpus_at_min_replicas: int
    gpu_share_allocated: float
    gpu_memory_utilisation: float
    warnings: tuple[str, ...] = field(default=())

    @property
    def usd_per_hour(self) -> float:
        return round(self.gpus_needed * self.usd_per_gpu_hour, 2)

    @property
    def usd_per_hour_at_min_replicas(self) -> float:
        return round(self.gpus_at_min_replicas * self.usd_per_gpu_hour, 2)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for sizing in out["sizings"]:
            if sizing["need"] is not None:
                sizing["need"]["total_gib"] = round(sum(sizing["need"][k] for k in ("weights_gib", "kv_cache_gib", "overhead_gib")), 2)
        out["usd_per_hour"] = self.usd_per_hour
        out["usd_per_hour_at_min_replicas"] = self.usd_per_hour_at_min_replicas
        return out


# --- memory -------------------------------------------------------------------------------


def model_id(version: ModelVersionConfig) -> str | None:
    """The key of the version's model in ``model_shapes``."""
    engine = version.engine
    if engine.kind == "vllm":
        return engine.model
    if engine.kind == "sglang":
        return engine.model_path
    if engine.kind == "hf":
        return engine.model_path or engine.gguf_package
    return None


def _engine_knobs(version: ModelVersionConfig) -> tuple[int, float | None, int | None, int | None]:
    """(tensor parallel GPUs, configured memory fraction, context tokens, running sequences)."""
    engine = version.engine
    if engine.kind == "vllm":
        return engine.tensor_parallel_size, engine.gpu_memory_utilization, engine.max_model_len, engine.max_num_seqs
    if engine.kind == "sglang":
        return engine.tp_size, engine.mem_fraction_static, engine.context_length, engine.max_running_requests
    if engine.kind == "hf":
        return 1, None, engine.max_context_tokens, engine.max_batch_size
    return max(1, int(version.resources.num_gpus)), None, None, None


def _weight_bytes(version: ModelVersionConfig, shape: ModelShapeConfig) -> float:
    if shape.weight_bytes_per_param is not None:
        return shape.weight_bytes_per_param
    engine = version.engine
    quant = (getattr(engine, "quantization", None) or "").lower()
    if quant.startswith(("awq", "gptq", "bitsandbytes", "marlin")):
        return 0.5
    if quant.startswith(("fp8", "int8", "w8")):
        return 1.0
    return 4.0 if getattr(engine, "dtype", "auto") == "float32" else 2.0


def _kv_bytes(version: ModelVersionConfig) -> float:
    extra = getattr(version.engine, "extra_engine_args", {}) or {}
    kv_dtype = str(extra.get("kv_cache_dtype", "auto")).lower()
    return 1.0 if kv_dtype.startswith("fp8") else 2.0


def memory_need(version: ModelVersionConfig, shape: ModelShapeConfig, overhead_gib: float = OVERHEAD_GIB) -> MemoryNeed | str:
    """Per-GPU memory of one replica, or why it cannot be worked out."""
    tp, _, context, seqs = _engine_knobs(version)
    context = context or shape.max_context_tokens
    if context is None:
        return "no context length: set the engine's max_model_len (or the shape's max_context_tokens)"
    # A replica never runs more sequences than Serve lets into it.
    seqs = min(seqs or version.max_ongoing_requests, version.max_ongoing_requests)
    weights = shape.params_b * 1e9 * _weight_bytes(version, shape) / GIB
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * _kv_bytes(version)
    kv = per_token * context * seqs / GIB
    return MemoryNeed(round(weights / tp, 2), round(kv / tp, 2), overhead_gib, tp, seqs, context)


def _ceil_to(x: float, step: float) -> float:
    return round(math.ceil(x / step - _EPS) * step, 4)


# --- sizing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Demand:
    deployment: str
    num_gpus: float
    num_cpus: float
    min_replicas: int
    max_replicas: int
    engine_fraction: float | None
    host_gib: float


def _size(
    name: str, version: ModelVersionConfig, shapes: dict[str, ModelShapeConfig], gpu: GPUType, as_configured: bool, overhead_gib: float
) -> tuple[Sizing, Unplaced | None, list[str]]:
    auto = version.autoscaling
    tp, configured_fraction, _, _ = _engine_knobs(version)
    configured = version.resources.num_gpus
    key = model_id(version)
    shape = shapes.get(key) if key else None
    need = memory_need(version, shape, overhead_gib) if shape else None
    warnings: list[str] = []
    unplaced = None
    num_gpus, fraction = configured, configured_fraction
    if isinstance(need, str):
        unplaced, need = Unplaced(name, need), None
    elif need is None and configured_fraction is not None and not as_configured:
        unplaced = Unplaced(name, f"no entry for {key!r} in model_shapes: add params_b, layers, kv_heads and head_dim to size it")
    elif need is not None:
        wanted = need.total_gib / gpu.memory_gib
        auto_cfg = version.autoscaling
        if auto_cfg.policy == "llm" and auto_cfg.target_ongoing_requests > need.kv_sequences:
            warnings.append(
                f"{name}: autoscaling targets {auto_cfg.target_ongoing_requests:g} requests a replica but the engine runs "
                f"{need.kv_sequences} at once; the rest queue inside the engine before the policy asks for a replica"
            )
        if as_configured:
            if fraction is not None and configured < 1 and (configured - fraction) * gpu.memory_gib + _EPS < CUDA_CONTEXT_GIB:
                warnings.append(
                    f"{name}: num_gpus {configured:g} leaves under {CUDA_CONTEXT_GIB} GiB above the engine's memory fraction "
                    f"{fraction:g} for its CUDA context; replicas sharing the GPU may not all start"
                )
            if fraction is not None and fraction * gpu.memory_gib + _EPS < need.total_gib:
                warnings.append(
                    f"{name}: engine memory {fraction * gpu.memory_gib:.1f} GiB on {gpu.name} is under the "
                    f"{need.total_gib:.1f} GiB for {need.kv_sequences} sequences of {need.kv_tokens_per_sequence} tokens; "
                    "the engine will run fewer sequences at once"
                )
        elif wanted > MAX_ENGINE_FRACTION:
            least_tp = math.ceil((need.weights_gib + need.kv_cache_gib) * need.gpus / (MAX_ENGINE_FRACTION * gpu.memory_gib - overhead_gib))
            unplaced = Unplaced(
                name,
                f"one replica needs {need.total_gib:.1f} GiB per GPU (weights {need.weights_gib:.1f}, KV cache "
                f"{need.kv_cache_gib:.1f} for {need.kv_sequences} x {need.kv_tokens_per_sequence} tokens, overhead "
                f"{need.overhead_gib:.1f}); {gpu.name} holds {gpu.memory_gib:.1f} GiB: use tensor parallelism "
                f"of at least {least_tp}, fewer sequences or a shorter max_model_len, or a larger GPU",
            )
        else:
            fraction = _ceil_to(wanted, MEMORY_STEP)
            num_gpus = float(tp) if tp > 1 else min(1.0, _ceil_to(fraction + CUDA_CONTEXT_GIB / gpu.memory_gib, FRACTION_STEP))
    sizing = Sizing(
        name, version.engine.kind, version.resources.num_cpus, auto.min_replicas, auto.max_replicas,
        configured, num_gpus, configured_fraction, fraction, need,
    )
    return sizing, unplaced, warnings


def _host_gib(sizing: Sizing) -> float:
    # Weights pass through host memory while they load, and each CPU gets a working share.
    weights = sizing.need.weights_gib * sizing.need.gpus if sizing.need else 0.0
    return weights + HOST_GIB_PER_CPU * sizing.num_cpus


def _cpu_demand(name: str, resources: ResourcesConfig, auto) -> _Demand:
    return _Demand(name, resources.num_gpus, resources.num_cpus, auto.min_replicas, auto.max_replicas, None, HOST_GIB_PER_CPU * resources.num_cpus)


# --- packing --------------------------------------------------------------------------------


@dataclass
class _Pods:
    gpus_per_pod: int
    max_gpus: int | None
    load: list[float] = field(default_factory=list)

    def _grow(self) -> bool:
        if self.max_gpus is not None and len(self.load) + self.gpus_per_pod > self.max_gpus:
            return False
        self.load.extend([0.0] * self.gpus_per_pod)
        return True

    def place(self, need: float) -> int | None:
        """The index of the (first) GPU the replica lands on, or None when the cap is hit."""
        while True:
            if need >= 1 - _EPS:
                whole = int(round(need))
                for start in range(0, len(self.load), self.gpus_per_pod):
                    free = [i for i in range(start, start + self.gpus_per_pod) if self.load[i] <= _EPS]
                    if len(free) >= whole:
                        for i in free[:whole]:
                            self.load[i] = 1.0
                        return free[0]
            else:
                for i, used in enumerate(self.load):
                    if used + need <= 1 + _EPS:
                        self.load[i] = used + need
                        return i
            if not self._grow():
                return None


def _pack_gpus(demands: list[_Demand], gpus_per_pod: int, count: str, max_gpus: int | None) -> tuple[list[tuple[_Demand, int, int | None]], _Pods]:
    """First-fit decreasing in two rounds: every deployment's min_replicas, then the replicas
    up to ``count``. Under a GPU cap each deployment so keeps its floor before any grows, and
    the first pods hold the floor (the pods that never scale away)."""
    rounds = [[(d, r) for d in demands for r in range(min(d.min_replicas, getattr(d, count)))]]
    rounds.append([(d, r) for d in demands for r in range(d.min_replicas, getattr(d, count))])
    pods = _Pods(gpus_per_pod, max_gpus)
    out = []
    for items in rounds:
        items.sort(key=lambda item: -item[0].num_gpus)  # stable: config order within a size
        out += [(d, r, pods.place(d.num_gpus)) for d, r in items]
    return out, pods


def _pack_cpus(demands: list[_Demand], count: str, pod_cpus: int) -> int:
    loads: list[float] = []
    for need in sorted((d.num_cpus for d in demands for _ in range(getattr(d, count))), reverse=True):
        for i, used in enumerate(loads):
            if used + need <= pod_cpus + _EPS:
                loads[i] = used + need
                break
        else:
            loads.append(need)
    return len(loads)


def plan_cluster(
    cfg: ClusterConfig,
    gpu_type: str = DEFAULT_GPU,
    *,
    as_configured: bool = False,
    usd_per_gpu_hour: float | None = None,
    max_gpus: int | None = None,
    overhead_gib: float = OVERHEAD_GIB,
) -> Plan:
    """The plan for every replica of ``cfg`` on GPUs of ``gpu_type`` (see the module docstring)."""
    gpu = find_gpu(gpu_type)
    sizings, unplaced, warnings = [], [], []
    for model, version in cfg.model_deployments():
        sizing, problem, notes = _size(deployment_name(model.name, version.name), version, cfg.model_shapes, gpu, as_configured, overhead_gib)
        sizings.append(sizing)
        warnings += notes
        if problem:
            unplaced.append(problem)
    blocked = {u.deployment for u in unplaced}
    fractions = {s.deployment: s.engine_memory_fraction for s in sizings}
    gpu_demands = [
        _Demand(s.deployment, s.num_gpus, s.num_cpus, s.min_replicas, s.max_replicas, s.engine_memory_fraction, _host_gib(s))
        for s in sizings
        if s.num_gpus > 0 and s.deployment not in blocked
    ]
    cpu_demands = [
        _Demand(s.deployment, 0.0, s.num_cpus, s.min_replicas, s.max_replicas, None, _host_gib(s))
        for s in sizings
        if s.num_gpus == 0 and s.deployment not in blocked
    ]
    for name, block in (("router", cfg.router), ("gateway", cfg.gateway)):
        (gpu_demands if block.resources.num_gpus > 0 else cpu_demands).append(_cpu_demand(name, block.resources, block.autoscaling))

    gpus_per_pod = max([math.ceil(d.num_gpus - _EPS) for d in gpu_demands if d.num_gpus >= 1] or [1])
    group = f"gpu-{gpu.name.lower()}"
    packed, pods = _pack_gpus(gpu_demands, gpus_per_pod, "max_replicas", max_gpus)
    _, min_pods = _pack_gpus(gpu_demands, gpus_per_pod, "min_replicas", None)
    placements, lost = [], {}
    pod_cpus: dict[int, float] = {}
    pod_host: dict[int, float] = {}
    for demand, replica, index in packed:
        if index is None:
            lost[demand.deployment] = lost.get(demand.deployment, 0) + 1
            continue
        pod = index // gpus_per_pod
        pod_cpus[pod] = pod_cpus.get(pod, 0.0) + demand.num_cpus
        pod_host[pod] = pod_host.get(pod, 0.0) + demand.host_gib
        share = min(demand.num_gpus, 1.0)
        placements.append(Placement(demand.deployment, replica, demand.num_gpus, fractions.get(demand.deployment), round(share * gpu.memory_gib, 2), group, index))
    for name, n in lost.items():
        wanted = next(d.max_replicas for d in gpu_demands if d.deployment == name)
        unplaced.append(Unplaced(name, f"{n} of its {wanted} replicas find no room: the cap of {max_gpus} {gpu.name} GPUs is full"))
    placements.sort(key=lambda p: (p.gpu_index, p.deployment, p.replica))

    groups = []
    gpus_needed = len(pods.load) if placements else 0
    if placements:
        groups.append(
            WorkerGroup(
                group, gpu.name, gpus_per_pod, max(1, math.ceil(max(pod_cpus.values()) - _EPS)),
                max(MIN_POD_GIB, math.ceil(max(pod_host.values()))), len(min_pods.load) // gpus_per_pod, gpus_needed // gpus_per_pod,
            )
        )
    cpu_pod = max([CPU_POD_CPUS] + [math.ceil(d.num_cpus) for d in cpu_demands])
    cpu_max = _pack_cpus([d for d in cpu_demands if d.num_cpus > 0], "max_replicas", cpu_pod)
    if cpu_max:
        cpu_min = _pack_cpus([d for d in cpu_demands if d.num_cpus > 0], "min_replicas", cpu_pod)
        groups.append(WorkerGroup("cpu", None, 0, cpu_pod, max(MIN_POD_GIB, HOST_GIB_PER_CPU * cpu_pod), cpu_min, cpu_max))

    need_by = {s.deployment: s.need for s in sizings}
    allocated = sum(p.num_gpus for p in placements)
    used_gib = sum(
        (need_by[p.deployment].total_gib * need_by[p.deployment].gpus if need_by.get(p.deployment) else p.gpu_memory_gib * max(1.0, p.num_gpus))
        for p in placements
    )
    return Plan(
        gpu_type=gpu.name,
        gpu_memory_gib=gpu.memory_gib,
        usd_per_gpu_hour=gpu.usd_per_hour if usd_per_gpu_hour is None else usd_per_gpu_hour,
        sizings=tuple(sizings),
        placements=tuple(placements),
        unplaced=tuple(unplaced),
        worker_groups=tuple(groups),
        gpus_needed=gpus_needed,
        gpus_at_min_replicas=len(min_pods.load),
        gpu_share_allocated=round(allocated / gpus_needed, 3) if gpus_needed else 0.0,
        gpu_memory_utilisation=round(used_gib / (gpus_needed * gpu.memory_gib), 3) if gpus_needed else 0.0,
        warnings=tuple(warnings),
    )
