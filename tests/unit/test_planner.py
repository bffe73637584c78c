"""The GPU capacity planner (``autoscaling.planner``) and ``slmctl plan``: table tests."""

from __future__ import annotations

import json
import random

import pytest

from autoscaling.gpus import gpu_type
from autoscaling.planner import memory_need, plan_cluster
from autoscaling.plan_cli import cmd_plan, register
from cluster.config import ModelShapeConfig
from cluster.errors import ConfigError
from cluster.loader import config_from_dict, load_profile

QWEN_1_5B = {"params_b": 1.54, "layers": 28, "kv_heads": 2, "head_dim": 128}


def _config(versions: list[dict], shapes: dict | None = None) -> dict:
    """A config whose general model carries the given versions (plus the usual router/gateway)."""
    return {
        "models": [{"name": "general", "role": "general", "versions": versions}],
        "router": {"kind": "heuristic", "resources": {"num_cpus": 1}},
        "gateway": {"resources": {"num_cpus": 1}},
        "model_shapes": shapes or {},
    }


def _vllm(name: str, *, model: str = "qwen", gpus: float = 0.5, mem: float = 0.45, max_len: int = 4096, seqs: int = 16, tp: int = 1,
          replicas: tuple[int, int] = (1, 1)) -> dict:
    return {
        "name": name,
        "engine": {"kind": "vllm", "model": model, "gpu_memory_utilization": mem, "max_model_len": max_len, "max_num_seqs": seqs,
                   "tensor_parallel_size": tp},
        "resources": {"num_gpus": gpus, "num_cpus": 1},
        "autoscaling": {"min_replicas": replicas[0], "max_replicas": replicas[1]},
        "max_ongoing_requests": 64,
    }


def test_memory_need_is_weights_plus_kv_for_every_sequence_plus_overhead() -> None:
    cfg = config_from_dict(_config([_vllm("v1", max_len=8192, seqs=64)], {"qwen": QWEN_1_5B}))
    need = memory_need(cfg.models[0].versions[0], ModelShapeConfig(**QWEN_1_5B))
    assert need.weights_gib == round(1.54e9 * 2 / 1024**3, 2)
    # 2 (K and V) x 28 layers x 2 KV heads x 128 x 2 bytes = 28,672 bytes a token
    assert need.kv_cache_gib == round(28_672 * 8192 * 64 / 1024**3, 2) == 14.0
    assert need.total_gib == pytest.approx(need.weights_gib + 14.0 + 1.5)


def test_running_sequences_never_exceed_what_serve_lets_in_and_fp8_halves_the_bytes() -> None:
    version = _vllm("v1", seqs=512)
    version["max_ongoing_requests"] = 8
    version["engine"]["quantization"] = "fp8"
    version["engine"]["extra_engine_args"] = {"kv_cache_dtype": "fp8"}
    cfg = config_from_dict(_config([version], {"qwen": QWEN_1_5B}))
    need = memory_need(cfg.models[0].versions[0], ModelShapeConfig(**QWEN_1_5B))
    assert need.kv_sequences == 8
    assert need.weights_gib == round(1.54e9 / 1024**3, 2)
    assert need.kv_cache_gib == round(28_672 / 2 * 4096 * 8 / 1024**3, 2)


def test_gpu_profile_on_h100_fits_and_its_fractions_are_the_plans() -> None:
    """The gpu profile's num_gpus and engine memory fractions are what the planner sizes on an
    H100 80GB, so that the checked-in profile and the plan never drift apart."""
    cfg = load_profile("gpu")
    plan = plan_cluster(cfg, "H100-80GB")
    assert plan.unplaced == ()
    for s in plan.sizings:
        assert s.num_gpus == s.configured_num_gpus, s.deployment
        assert s.engine_memory_fraction == s.configured_engine_memory_fraction, s.deployment
        if s.engine_memory_fraction is not None:
            assert s.engine_memory_fraction <= s.num_gpus
            assert s.need.total_gib <= s.engine_memory_fraction * plan.gpu_memory_gib
    assert plan_cluster(cfg, "H100-80GB", as_configured=True).warnings == ()
    assert (plan.gpus_needed, plan.gpus_at_min_replicas) == (7, 2)  # legal and medical scale to zero
    gpu_group, cpu_group = plan.worker_groups
    assert (gpu_group.gpu_type, gpu_group.gpus_per_pod, gpu_group.min_pods, gpu_group.max_pods) == ("H100-80GB", 1, 2, 7)
    assert cpu_group.gpu_type is None and cpu_group.min_pods >= 1
    # every replica up to max_replicas is placed, and no GPU is over-committed
    placed = {}
    for p in plan.placements:
        placed[p.deployment] = placed.get(p.deployment, 0) + 1
    assert placed == {s.deployment: s.max_replicas for s in plan.sizings if s.num_gpus > 0}
    assert "frontier-v1" not in placed
    _assert_no_gpu_overcommitted(plan)
    assert plan.usd_per_hour == 7 * gpu_type("H100-80GB").usd_per_hour
    assert 0.9 <= plan.gpu_share_allocated <= 1


def test_gpu_profile_on_l4_sizes_the_small_models_up_and_names_what_cannot_fit() -> None:
    plan = plan_cluster(load_profile("gpu"), "L4-24GB")
    by_name = {s.deployment: s for s in plan.sizings}
    # a 1.5B model with 14 GiB of KV cache takes most of a 22.5 GiB L4
    assert by_name["code-v1"].num_gpus == 0.85 and by_name["code-v1"].engine_memory_fraction == 0.82
    unplaced = {u.deployment: u.reason for u in plan.unplaced}
    assert set(unplaced) == {"legal-v1", "medical-v1", "general-v1"}
    assert "31.0 GiB per GPU" in unplaced["legal-v1"] and "tensor parallelism of at least 2" in unplaced["legal-v1"]
    assert "tensor parallelism of at least 4" in unplaced["general-v1"]
    assert all(p.deployment in ("code-v1", "math-v1") for p in plan.placements)


def test_a_plan_that_cannot_fit_under_a_gpu_cap_reports_the_replicas_left_over() -> None:
    plan = plan_cluster(load_profile("gpu"), "H100-80GB", max_gpus=3)
    assert plan.gpus_needed == 3
    reasons = {u.deployment: u.reason for u in plan.unplaced}
    assert reasons  # 7 GPUs' worth of replicas cannot all land on 3
    assert all("cap of 3 H100-80GB GPUs is full" in r for r in reasons.values())
    # every deployment's min_replicas is placed before any deployment grows (legal and
    # medical scale to zero, so they have no floor)
    floors = {"code-v1", "math-v1", "general-v1"}
    assert floors <= {p.deployment for p in plan.placements if p.replica == 0}
    # on 1 GPU not even the floors fit (general 0.85 + math 0.15 fill it), and code is named
    tight = plan_cluster(load_profile("gpu"), "H100-80GB", max_gpus=1)
    assert [p.deployment for p in tight.placements] == ["general-v1", "math-v1"]
    assert "code-v1" in {u.deployment for u in tight.unplaced}
    _assert_no_gpu_overcommitted(plan)


def test_fraction_memory_mismatch_and_tensor_parallelism_beyond_the_gpus_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(_config([_vllm("v1", gpus=0.25, mem=0.4), _vllm("v2", gpus=1, mem=0.9, tp=2)]))
    issues = dict(err.value.issues)
    assert "gpu_memory_utilization 0.4 claims more of the GPU than the replica's resources.num_gpus 0.25" in (
        issues["models[general].versions[v1].engine.gpu_memory_utilization"]
    )
    assert "tensor_parallel_size 2" in issues["models[general].versions[v2].engine.tensor_parallel_size"]


def test_as_configured_packs_the_configs_fractions_and_warns_when_memory_is_short() -> None:
    cfg = config_from_dict(_config([_vllm("v1", gpus=0.25, mem=0.1, max_len=8192, seqs=64)], {"qwen": QWEN_1_5B}))
    configured = plan_cluster(cfg, "H100-80GB", as_configured=True)
    assert configured.placements[0].num_gpus == 0.25 and configured.placements[0].engine_memory_fraction == 0.1
    assert "general-v1: engine memory 8.0 GiB on H100-80GB is under the 18.4 GiB" in configured.warnings[0]
    sized = plan_cluster(cfg, "H100-80GB")
    assert (sized.sizings[0].num_gpus, sized.sizings[0].engine_memory_fraction) == (0.25, 0.24)


def test_tensor_parallel_replicas_take_whole_gpus_of_one_pod() -> None:
    shape = {"params_b": 70.6, "layers": 80, "kv_heads": 8, "head_dim": 128}
    cfg = config_from_dict(_config([_vllm("v1", model="llama70b", gpus=4, mem=0.9, tp=4, replicas=(1, 2))], {"llama70b": shape}))
    plan = plan_cluster(cfg, "H100-80GB")
    assert plan.unplaced == ()
    assert [p.gpu_index for p in plan.placements] == [0, 4]
    assert plan.worker_groups[0].gpus_per_pod == 4 and plan.worker_groups[0].max_pods == 2
    assert plan.sizings[0].need.gpus == 4 and plan.sizings[0].need.weights_gib == round(70.6e9 * 2 / 1024**3 / 4, 2)


def test_a_missing_shape_is_named_when_sizing_and_tolerated_as_configured() -> None:
    cfg = config_from_dict(_config([_vllm("v1", model="mystery")]))
    assert "no entry for 'mystery' in model_shapes" in plan_cluster(cfg).unplaced[0].reason
    assert plan_cluster(cfg, as_configured=True).unplaced == ()


def test_scale_to_zero_specialists_need_no_gpu_at_min_replicas() -> None:
    cfg = config_from_dict(_config([_vllm("v1", replicas=(0, 2))], {"qwen": QWEN_1_5B}))
    plan = plan_cluster(cfg, "H100-80GB")
    assert plan.gpus_at_min_replicas == 0 and plan.worker_groups[0].min_pods == 0 and plan.gpus_needed == 1


def test_first_fit_decreasing_never_overcommits_a_gpu_on_random_mixes() -> None:
    rng = random.Random(7)
    for _ in range(40):
        versions = []
        for i in range(rng.randint(1, 5)):
            gpus = rng.choice([0.15, 0.25, 0.3, 0.4, 0.5, 0.6, 0.85, 1, 2])
            versions.append(_vllm(f"v{i}", gpus=gpus, mem=min(gpus, 0.9) if gpus < 1 else 0.9, tp=int(gpus) if gpus >= 1 else 1,
                                  replicas=(rng.randint(0, 1), rng.randint(1, 4))))
        plan = plan_cluster(config_from_dict(_config(versions)), "H100-80GB", as_configured=True)
        _assert_no_gpu_overcommitted(plan)
        assert sum(p.num_gpus for p in plan.placements) <= plan.gpus_needed + 1e-9
        # first-fit decreasing opens a new GPU only when the item fits in none: at most one
        # GPU is less than half full among those holding fractional replicas
        fractional = _loads(plan)
        assert sum(1 for load in fractional.values() if load < 0.5) <= 1


def _loads(plan) -> dict[int, float]:
    loads: dict[int, float] = {}
    for p in plan.placements:
        if p.num_gpus < 1:
            loads[p.gpu_index] = loads.get(p.gpu_index, 0.0) + p.num_gpus
    return loads


def _assert_no_gpu_overcommitted(plan) -> None:
    whole = {p.gpu_index + k for p in plan.placements if p.num_gpus >= 1 for k in range(int(p.num_gpus))}
    for index, load in _loads(plan).items():
        assert load <= 1 + 1e-9, (index, load)
        assert index not in whole


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    rc = cmd_plan(args)
    return rc, capsys.readouterr().out


def test_cli_json_has_the_documented_fields_and_exit_codes(capsys) -> None:
    rc, out = _run_cli(["plan", "--json"], capsys)
    report = json.loads(out)
    assert rc == 0 and report["gpus_needed"] == 7 and report["unplaced"] == []
    assert set(report["placements"][0]) == {
        "deployment", "replica", "num_gpus", "engine_memory_fraction", "gpu_memory_gib", "worker_group", "gpu_index"
    }
    rc, out = _run_cli(["plan", "--gpu", "L4-24GB", "--json"], capsys)
    assert rc == 1 and {u["deployment"] for u in json.loads(out)["unplaced"]} == {"legal-v1", "medical-v1", "general-v1"}
    assert set(json.loads(out)["unplaced"][0]) == {"deployment", "reason"}
    rc, out = _run_cli(["plan"], capsys)
    assert "GPU 0: general-v1#0 0.85, math-v1#0 0.15" in out and "GPUs needed: 7 at max_replicas, 2 at min_replicas" in out
    assert _run_cli(["plan", "--gpu", "TPU-v5"], capsys)[0] == 2
