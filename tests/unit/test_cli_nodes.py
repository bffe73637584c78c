"""`slmctl status` on more than one node: which node each replica runs on, and --address."""

from __future__ import annotations

import pytest

from cluster.cli.main import build_parser
from cluster.cli.nodes import nodes_from_summary, nodes_table, replica_placements, replicas_table, short_id
from cluster.cli.ray_cluster import LocalCluster, RayClusterError

HEAD, W1, W2 = "aa11" * 14, "bb22" * 14, "cc33" * 14


def _node(node_id: str, head: bool, cpus: float, gpus: float, state: str = "ALIVE") -> dict:
    total = {"memory": 1e9, "node:10.0.0.1": 1.0, **({"CPU": cpus} if cpus else {}), **({"GPU": gpus} if gpus else {})}
    return {"ip": "10.0.0.9", "raylet": {"nodeId": node_id, "nodeManagerAddress": "10.0.0.1" if head else "10.0.0.2",
                                         "isHeadNode": head, "state": state, "resourcesTotal": total}}


# The shapes of the dashboard's /nodes?view=summary and /api/serve/applications/ (Ray 2.60).
SUMMARY = {"result": True, "data": {"summary": [_node(W2, False, 2, 1), _node(HEAD, True, 0, 0), _node(W1, False, 2, 1, "DEAD")]}}
DETAILS = {
    "applications": {
        "slm": {
            "deployments": {
                "code-v1": {
                    "deployment_config": {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0.25}},
                    "replicas": [{"replica_id": "r1", "state": "RUNNING", "node_id": W2, "node_ip": "10.0.0.2"}],
                },
                "general-v1": {
                    "deployment_config": {"ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0.4}},
                    "replicas": [
                        {"replica_id": "g1", "state": "RUNNING", "node_id": W2, "node_ip": "10.0.0.2"},
                        {"replica_id": "g2", "state": "STARTING", "node_id": None, "node_ip": None},
                    ],
                },
                "gateway": {
                    "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}},
                    "replicas": [{"replica_id": "w1", "state": "RUNNING", "node_id": "dd44" * 14, "node_ip": "10.0.0.3"}],
                },
            }
        },
        "other": {"deployments": {"x": {"replicas": [{"replica_id": "x1", "state": "RUNNING", "node_id": W2, "node_ip": "10.0.0.2"}]}}},
    }
}


def test_short_id() -> None:
    assert short_id(HEAD) == "aa11aa11" and short_id(None) == "-" and short_id("") == "-"


def test_nodes_from_summary_puts_the_head_first_and_reads_logical_resources() -> None:
    nodes = nodes_from_summary(SUMMARY)
    assert [(n.node_id, n.is_head, n.state, n.cpus, n.gpus, n.ip) for n in nodes] == [
        (HEAD, True, "ALIVE", 0.0, 0.0, "10.0.0.1"),
        (W1, False, "DEAD", 2.0, 1.0, "10.0.0.2"),
        (W2, False, "ALIVE", 2.0, 1.0, "10.0.0.2"),
    ]
    assert nodes_from_summary({}) == [] and nodes_from_summary({"data": {"summary": [{"raylet": {}}]}}) == []


def test_replica_placements_carry_node_and_resources() -> None:
    reps = replica_placements(DETAILS)
    assert [(r.app, r.deployment, r.replica_id, r.state, r.node_id, r.num_gpus) for r in reps] == [
        ("other", "x", "x1", "RUNNING", W2, 0.0),
        ("slm", "code-v1", "r1", "RUNNING", W2, 0.25),
        ("slm", "gateway", "w1", "RUNNING", "dd44" * 14, 0.0),
        ("slm", "general-v1", "g1", "RUNNING", W2, 0.4),
        ("slm", "general-v1", "g2", "STARTING", None, 0.4),
    ]


def test_replicas_table_names_each_replica_node_short_id_and_ip() -> None:
    lines = replicas_table(replica_placements(DETAILS), "slm").splitlines()
    assert lines[0].split() == ["REPLICA", "STATE", "NODE", "NODE", "IP"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["code-v1#r1", "RUNNING", "cc33cc33", "10.0.0.2"],
        ["gateway#w1", "RUNNING", "dd44dd44", "10.0.0.3"],
        ["general-v1#g1", "RUNNING", "cc33cc33", "10.0.0.2"],
        ["general-v1#g2", "STARTING", "-", "-"],  # not placed yet
    ]
    assert replicas_table([], "slm").splitlines()[1] == "(no replicas)"


def test_nodes_table_counts_running_replicas_and_their_gpu_share_per_node() -> None:
    lines = nodes_table(nodes_from_summary(SUMMARY), replica_placements(DETAILS)).splitlines()
    assert lines[0].split() == ["NODE", "IP", "ROLE", "STATE", "CPU", "GPU", "GPU", "USED", "REPLICAS"]
    rows = [line.split() for line in lines[1:]]
    assert rows[0] == ["aa11aa11", "10.0.0.1", "head", "ALIVE", "0", "0", "0", "0"]
    assert rows[1] == ["bb22bb22", "10.0.0.2", "worker", "DEAD", "2", "1", "0", "0"]
    # code 0.25 + general 0.4 (the STARTING replica holds nothing yet) + the other app's replica
    assert rows[2] == ["cc33cc33", "10.0.0.2", "worker", "ALIVE", "2", "1", "0.65", "3"]
    # a replica on a node the summary no longer lists still shows up
    assert rows[3] == ["dd44dd44", "10.0.0.3", "?", "?", "?", "?", "0", "1"]


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("http://10.0.0.5:8265", "10.0.0.5", 8265),
        ("10.0.0.5:9999", "10.0.0.5", 9999),
        ("http://head.example:8265/", "head.example", 8265),
        ("head.example", "head.example", 8265),
    ],
)
def test_address_is_a_dashboard_url(address: str, host: str, port: int) -> None:
    cluster = LocalCluster.at_address(address)
    assert (cluster.host, cluster.dashboard_port, cluster.joined) == (host, port, True)
    assert cluster.dashboard_url == f"http://{host}:{port}"


@pytest.mark.parametrize("address", ["http://", "http://10.0.0.5:notaport", "ray://10.0.0.5:10001", "http://10.0.0.5:8265/api"])
def test_a_bad_address_is_refused(address: str) -> None:
    with pytest.raises(RayClusterError, match="dashboard URL"):
        LocalCluster.at_address(address)


def test_a_joined_cluster_is_never_started_or_stopped_by_slmctl() -> None:
    cluster = LocalCluster.at_address("http://127.0.0.1:1")
    assert cluster.started_by_slmctl() is False
    with pytest.raises(RayClusterError, match="never by slmctl"):
        cluster.start(num_cpus=None, num_gpus=None)
    with pytest.raises(RayClusterError, match="never by slmctl"):
        cluster.stop()


def test_up_status_down_take_address() -> None:
    parser = build_parser()
    for command in ("up", "status", "down", "deploy"):
        extra = ["--config", "x.yaml"] if command == "deploy" else []
        args = parser.parse_args([command, "--address", "http://10.0.0.5:8265", *extra])
        assert args.address == "http://10.0.0.5:8265"


def test_up_refuses_node_sizing_flags_with_address(tmp_path, capsys) -> None:
    from cluster.cli.main import EXIT_BAD_CONFIG, main

    assert main(["up", "--profile", "sim", "--address", "http://127.0.0.1:1", "--num-gpus", "2"]) == EXIT_BAD_CONFIG
    assert "--num-gpus" in capsys.readouterr().err
