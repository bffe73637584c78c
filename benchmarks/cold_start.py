"""The cold start of a model-server replica: from a request to a deployment at zero
replicas to its first token, for a ``fake`` replica and for the ``local`` profile's ``hf``
replica (SmolLM2-135M GGUF through transformers, on CPU).

Each trial: the deployment sits at zero replicas (``min_replicas: 0``, the LLM policy);
one streamed request goes through a handle; the time to its first chunk is the cold
start as a user who named the model sees it (the autoscaler's decision, the replica
actor's start, the engine's load, the first token). Then the same request again, warm.
Then the deployment is left idle until it is back at zero. The engine's load alone is
also timed in this process, for the hf engine.

    python -m benchmarks.cold_start [--engines fake,hf] [--trials 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import warnings
from typing import Any

from benchmarks.autoscaling import deploy_one, free_port, one_call, running_replicas, version_config

APP = "bench-cold"


def engine_for(kind: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(model name, engine config, resources) for ``kind``."""
    if kind == "fake":
        return "code", {"kind": "fake", "ttft_ms": 40, "tokens_per_s": 80, "default_completion_tokens": 8}, {"num_cpus": 0.05}
    from cluster.loader import load_profile

    version = load_profile("local").model("code").current
    return "code", version.engine.model_dump(), version.resources.model_dump()


def load_alone(engine: dict[str, Any]) -> float:
    """Seconds to create and start the engine in this process (no Ray)."""
    from cluster.config import ModelVersionConfig
    from deployments.engines import create_engine

    version = ModelVersionConfig.model_validate({"name": "v1", "engine": engine})
    started = time.monotonic()
    eng = create_engine(version.engine)
    asyncio.run(eng.start())
    took = time.monotonic() - started
    asyncio.run(eng.shutdown())
    return took


def wait_until(check: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def trials(kind: str, n: int) -> dict[str, Any]:
    model, engine, resources = engine_for(kind)
    autoscaling = {"policy": "llm", "min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 1, "downscale_to_zero_delay_s": 1,
                   "look_back_period_s": 2, "metrics_interval_s": 0.25}
    version = version_config(autoscaling, engine=engine, resources=resources)
    handle = deploy_one(version, model=model, app=APP)
    deployment = f"{model}-v1"
    cold, warm = [], []
    for _ in range(n):
        if not wait_until(lambda: running_replicas(APP, deployment) == 0, 120):
            raise SystemExit(f"{deployment} did not scale to zero")
        cold.append(asyncio.run(one_call(handle, 0))[0])
        warm.append(asyncio.run(one_call(handle, 1))[0])
    from ray import serve

    serve.delete(APP)
    row = {
        "engine": kind,
        "trials": n,
        "cold_first_token_s": f"{statistics.median(cold):.2f} (min {min(cold):.2f}, max {max(cold):.2f})",
        "warm_first_token_ms": f"{statistics.median(warm) * 1000:.0f}",
    }
    if kind == "hf":
        row["engine_load_alone_s"] = f"{load_alone(engine):.2f}"
    else:
        row["engine_load_alone_s"] = "0.00"
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="fake,hf")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=4)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from benchmarks.stats import table

    warnings.filterwarnings("ignore", message="The `metrics_interval_s` field")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        rows = [trials(kind, args.trials) for kind in args.engines.split(",")]
    finally:
        serve.shutdown()
        ray.shutdown()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
