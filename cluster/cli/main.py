"""slmctl: validate a cluster config, bring the ensemble up on a local Ray cluster, watch it, tear it down."""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata
from typing import Sequence

from cluster.cli import audit_cmd, embedded_redis, gate_cmd, guidance, keys_cmd, nodes
from cluster.cli.ray_cluster import LocalCluster, RayClusterError
from cluster.cli.report import app_view, in_gateway_line, progress_line, status_table
from cluster.config import ClusterConfig
from cluster.errors import ConfigError, InvalidRequestError, SLMError
from cluster.loader import PROFILES, load_config, resolve_config
from cluster.overrides import with_remote_frontier
from cluster.placement import fit_problems
from cluster.serve_config import CONTROLLER_APP, render_serve_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_DOES_NOT_FIT = 0, 1, 2, 3


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_validate(args: argparse.Namespace) -> int:
    worst = EXIT_OK
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as err:
            print(str(err), file=sys.stderr)
            worst = EXIT_BAD_CONFIG
            continue
        _say(f"{path}: OK ({len(cfg.models)} models, {len(cfg.model_deployments())} model deployments)")
    return worst


def _load_for_up(args: argparse.Namespace) -> ClusterConfig:
    cfg = resolve_config(profile=None if args.config else args.profile, path=args.config)
    if args.frontier_url:
        if not args.frontier_model:
            raise ConfigError("--frontier-url needs --frontier-model", issues=(("--frontier-model", "required with --frontier-url"),))
        cfg = with_remote_frontier(cfg, base_url=args.frontier_url, model=args.frontier_model, api_key_env=args.frontier_api_key_env)
    return cfg


def _cluster(args: argparse.Namespace) -> LocalCluster:
    """The local cluster on --dashboard-port, or the one --address names (joined: slmctl
    deploys onto it and reads it, but never starts or stops it)."""
    if getattr(args, "address", None):
        return LocalCluster.at_address(args.address)
    return LocalCluster(dashboard_port=args.dashboard_port, ray_port=getattr(args, "ray_port", 6379),
                        metrics_port=getattr(args, "metrics_port", 8080))


def _wait_until_running(cluster: LocalCluster, app: str, timeout_s: float) -> int:
    start = time.monotonic()
    last_line, last_print = "", 0.0
    while True:
        elapsed = time.monotonic() - start
        view = app_view(cluster.serve_details(), app)
        if view is not None:
            line = progress_line(view, elapsed)
            if line.split("] ", 1)[1] != last_line or elapsed - last_print > 15:
                _say(line)
                last_line, last_print = line.split("] ", 1)[1], elapsed
            if view.status == "RUNNING":
                return EXIT_OK
            if view.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                _say(status_table(view))
                _say(f"\nDeploy failed: {view.message[:2000]}")
                return EXIT_FAILED
            if any(r.waiting_for_resources for r in view.rows):
                _say(status_table(view))
                _say("\nThe plan does not fit: some replicas wait for resources this cluster lacks. "
                     "Lower num_gpus/num_cpus or replicas, or add nodes. `slmctl down` removes the app.")
                return EXIT_DOES_NOT_FIT
        if elapsed > timeout_s:
            if view is not None:
                _say(status_table(view))
            _say(f"\nNot running after {timeout_s:g}s; it may still be loading. Check `slmctl status`.")
            return EXIT_FAILED
        time.sleep(1.0)


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _load_for_up(args)
    port = args.port or cfg.gateway.port
    host = args.host or cfg.gateway.host
    cluster = _cluster(args)
    started = False
    if cluster.joined:
        if not _join(cluster, args):
            return EXIT_FAILED
    else:
        _say(f"Starting a local Ray cluster (dashboard on {cluster.dashboard_url}) ...")
        started = cluster.start(num_cpus=args.num_cpus, num_gpus=args.num_gpus, throughput_optimized=args.throughput_optimized)
        if not started:
            _say("  a Ray cluster is already running there; deploying onto it")
    # A cluster this call started runs nothing yet; on any other, say what would be replaced.
    refusal = None if started else guidance.replace_refusal(cluster.serve_details(), args.replace)
    if refusal:
        _say(refusal)
        return EXIT_FAILED
    cpus, gpus = cluster.resources()
    if _unfit(cfg, cpus, gpus, args.skip_fit_check, "The plan does not fit this cluster:",
              "Nothing was deployed. Lower the resources in the config, or start with more (--num-cpus/--num-gpus)."):
        return EXIT_DOES_NOT_FIT
    cfg = _with_redis(cfg, cluster)
    _say(f"Deploying {len(cfg.model_deployments())} model deployments + router + gateway ({cpus:g} CPUs, {gpus:g} GPUs) ...")
    cluster.deploy(render_serve_config(cfg, host=host, port=port))
    code = _wait_until_running(cluster, cfg.name, args.timeout_s)
    if code == EXIT_OK:
        _say(guidance.ready_banner(cfg, host, port, cluster))
    return code


def _join(cluster: LocalCluster, args: argparse.Namespace) -> bool:
    """Check that the cluster --address names answers; flags that size a local node are
    refused, since each node of a joined cluster got its resources from its own `ray start`."""
    sizing = [flag for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)) if value is not None]
    if sizing:
        raise InvalidRequestError(f"{' and '.join(sizing)} size a node slmctl starts; with --address each node's `ray start` sets its own resources")
    if not cluster.dashboard_up():
        _say(f"No Ray dashboard answers at {cluster.dashboard_url}. Start the head there first "
             "(`ray start --head --num-cpus 0 --dashboard-host 0.0.0.0`, see docs/multinode.md).")
        return False
    node_list = nodes.nodes_from_summary(cluster.node_summary())
    alive = [n for n in node_list if n.state == "ALIVE"]
    _say(f"Joining the Ray cluster at {cluster.dashboard_url} ({len(alive)} live nodes); slmctl will not start or stop it")
    return True


def _unfit(cfg: ClusterConfig, cpus: float, gpus: float, skip: bool, header: str, footer: str | None = None) -> bool:
    """Say why the plan does not fit (unless the check is skipped); True when it refuses."""
    problems = fit_problems(cfg, cpus, gpus)
    if not problems or skip:
        return False
    _say(header)
    for p in problems:
        _say(f"  - {p}")
    if footer:
        _say(footer)
    return True


def _with_redis(cfg: ClusterConfig, cluster: LocalCluster) -> ClusterConfig:
    """The config with a Redis: its own, else the cluster's embedded one (started if needed),
    so traffic splits and rollouts work out of the box. A joined cluster gets none: the
    embedded Redis listens on this machine's loopback, which other nodes cannot reach."""
    if cfg.redis.resolved_url(os.environ) is not None:
        return cfg
    if cluster.joined:
        _say("No Redis named in the config, and with --address slmctl starts none (other nodes could not reach it): "
             "every model serves its current version. Set redis.url to a Redis every node reaches for splits and canaries.")
        return cfg
    redis, started = embedded_redis.start(cluster.dashboard_port)
    _say(f"{'Started' if started else 'Using'} the embedded Redis at {redis.url} (data in {redis.directory})")
    return cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"url": redis.url})})


def cmd_deploy(args: argparse.Namespace) -> int:
    """Update the running application in place (the same Serve update a RayService spec
    change makes): deployments whose settings did not change keep their replicas, changed
    ones roll replica by replica, new versions start, and no request is dropped."""
    cfg = resolve_config(profile=None, path=args.config)
    cluster = _cluster(args)
    if not cluster.dashboard_up():
        _say(f"No Ray cluster answers at {cluster.dashboard_url}. Start one with `slmctl up`.")
        return EXIT_FAILED
    cpus, gpus = cluster.resources()
    if _unfit(cfg, cpus, gpus, args.skip_fit_check, "The new plan does not fit this cluster; nothing changed:"):
        return EXIT_DOES_NOT_FIT
    details = cluster.serve_details()
    running = (details.get("applications") or {}).get(cfg.name) or {}
    old = (running.get("deployed_app_config") or {}).get("args", {}).get("config")
    http = details.get("http_options") or {}
    cfg = _with_redis(cfg, cluster)
    if old:
        before = set(ClusterConfig.model_validate(old).deployment_names())
        after = set(cfg.deployment_names())
        _say(f"Updating {cfg.name} in place: adding {sorted(after - before) or 'nothing'}, removing {sorted(before - after) or 'nothing'}")
    cluster.deploy(render_serve_config(cfg, host=http.get("host"), port=http.get("port")))
    return _wait_until_running(cluster, cfg.name, args.timeout_s)


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if not cluster.dashboard_up():
        _say(f"No Ray cluster answers at {cluster.dashboard_url}. Start one with `slmctl up`.")
        return EXIT_FAILED
    details = cluster.serve_details()
    apps = list((details.get("applications") or {}).keys())
    auth = guidance.ray_auth_lines(cluster.dashboard_url, cluster.token_source(), cluster.token_auth_required())
    if not apps:
        _say("\n".join(["Ray is running, but no Serve application is deployed.", *auth]))
        return EXIT_FAILED
    cpus, gpus = cluster.resources()
    node_list = nodes.nodes_from_summary(cluster.node_summary())
    replicas = nodes.replica_placements(details)
    worst = EXIT_OK
    for name in apps:
        view = app_view(details, name)
        assert view is not None
        _say(status_table(view))
        _say(nodes.replicas_table(replicas, name))
        config = (details["applications"][name].get("deployed_app_config") or {}).get("args", {}).get("config")
        if config and name != CONTROLLER_APP:  # the controller app carries the same config
            try:
                deployed: ClusterConfig | None = ClusterConfig.model_validate(config)
            except Exception:  # noqa: BLE001 - an app deployed by something else
                deployed = None
            problems = fit_problems(deployed, cpus, gpus) if deployed is not None else []
            for p in problems:
                _say(f"DOES NOT FIT: {p}")
            if problems:
                worst = EXIT_DOES_NOT_FIT
            if deployed is not None:
                inline = in_gateway_line(deployed)
                if inline is not None:
                    _say(inline)
                _say(_traffic_store_line(deployed))
        if any(r.waiting_for_resources for r in view.rows):
            worst = EXIT_DOES_NOT_FIT
        elif view.status != "RUNNING" and worst == EXIT_OK:
            worst = EXIT_FAILED
    _say(nodes.nodes_table(node_list, replicas))
    _say(f"cluster: {len(node_list)} node(s), {cpus:g} CPUs, {gpus:g} GPUs; dashboard {cluster.dashboard_url}")
    for line in auth:
        _say(line)
    return worst


def _traffic_store_line(cfg: ClusterConfig) -> str:
    url = cfg.redis.resolved_url(os.environ)
    if url is None:
        return "traffic store: none (every model serves its current version)"
    problem = embedded_redis.ping(url, cfg.redis.password(os.environ), cfg.redis.timeout_s)
    shown = url.split("@")[-1]
    if problem is None:
        return f"traffic store: Redis at {shown} reachable"
    return f"traffic store: Redis at {shown} UNREACHABLE ({problem}); gateways serve with the last split they read"


def cmd_down(args: argparse.Namespace) -> int:
    """Delete the Serve applications; stop Ray only when `slmctl up` started it here.

    A joined cluster (--address) and a local Ray that someone else started keep running:
    slmctl stops only what it started (``LocalCluster.started_by_slmctl``)."""
    cluster = _cluster(args)
    stop_ray = not args.keep_ray and cluster.started_by_slmctl()
    if cluster.dashboard_up():
        try:
            apps = guidance.running_apps(cluster.serve_details())
            shown = ", ".join(f"{name} ({len(deps)} deployments)" for name, deps in apps) or "none running"
        except RayClusterError as err:
            shown = f"all of them (cannot list them: {err})"
        _say(f"Deleting the Serve applications at {cluster.dashboard_url}: {shown} ...")
        try:
            cluster.delete_applications()
        except RayClusterError as err:
            # A busy dashboard must not leave Ray and the embedded Redis running.
            _say(f"  could not delete them ({err}); stopping anyway" if stop_ray else f"  could not delete them ({err})")
            if not stop_ray:
                return EXIT_FAILED
    elif cluster.joined:
        _say(f"No Ray dashboard answers at {cluster.dashboard_url}; nothing to delete.")
        return EXIT_FAILED
    if stop_ray:
        # `ray stop` has no notion of one cluster: it ends every Ray process of this user here.
        _say(f"Stopping the local Ray that `slmctl up` started (dashboard {cluster.dashboard_url}) with `ray stop --force`, "
             "which ends every Ray process of this user on this machine ...")
        cluster.stop()
    elif cluster.joined:
        _say(f"Left the Ray cluster at {cluster.dashboard_url} running: slmctl did not start it.")
    elif args.keep_ray:
        _say(f"Left Ray at {cluster.dashboard_url} and the embedded Redis running (--keep-ray).")
    elif cluster.dashboard_up():
        _say(f"Left Ray at {cluster.dashboard_url} running: `slmctl up` did not start it (`ray stop` stops it).")
    if not cluster.joined and not args.keep_ray and embedded_redis.stop(args.dashboard_port):
        _say("Stopped the embedded Redis (its data stays for the next `slmctl up`).")
    _say("Down.")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def cluster_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port of the local cluster (default 8265)")
        p.add_argument(
            "--address",
            help="join a running Ray cluster through its dashboard URL, e.g. http://10.0.0.5:8265 (wins over --dashboard-port); "
            "slmctl never starts or stops that cluster (docs/multinode.md)",
        )

    up = sub.add_parser("up", help="start Ray (or join one with --address), deploy a profile or config, wait until it serves")
    src = up.add_mutually_exclusive_group()
    src.add_argument("--profile", default="local", choices=PROFILES, help="a built-in profile (default: local)")
    src.add_argument("--config", help="a cluster config file (YAML or JSON)")
    up.add_argument("--host", help="HTTP bind address (default: the config's gateway.host)")
    up.add_argument("--port", type=int, help="HTTP port of the API (default: the config's gateway.port, 8000)")
    up.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default 6379)")
    up.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics export port of the Ray node (default 8080)")
    up.add_argument("--num-cpus", type=float, help="logical CPUs of the local Ray node (default: all cores)")
    up.add_argument("--num-gpus", type=float, help="GPUs of the local Ray node (default: detected)")
    up.add_argument("--frontier-url", help="use this OpenAI-compatible endpoint for the frontier model")
    up.add_argument("--frontier-model", help="upstream model name for --frontier-url")
    up.add_argument("--frontier-api-key-env", help="env var holding the API key for --frontier-url")
    up.add_argument("--timeout-s", type=float, default=900, help="give up waiting after this long (default 900)")
    up.add_argument("--skip-fit-check", action="store_true", help="deploy even if the plan does not fit")
    up.add_argument("--replace", action="store_true", help="replace the Serve applications already running on the cluster")
    up.add_argument(
        "--throughput-optimized",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (default: on)",
    )
    cluster_flags(up)
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="deployments, replicas, GPU fractions and state, and the node of each replica")
    cluster_flags(status)
    status.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="delete the application and stop Ray if `slmctl up` started it")
    down.add_argument("--keep-ray", action="store_true", help="delete the application but leave Ray running")
    cluster_flags(down)
    down.set_defaults(func=cmd_down)

    deploy = sub.add_parser("deploy", help="update the running application in place from a config (e.g. add code@v3)")
    deploy.add_argument("--config", required=True, help="the new cluster config file")
    deploy.add_argument("--timeout-s", type=float, default=900, help="give up waiting after this long (default 900)")
    deploy.add_argument("--skip-fit-check", action="store_true", help="deploy even if the plan does not fit")
    cluster_flags(deploy)
    deploy.set_defaults(func=cmd_deploy)

    validate = sub.add_parser("validate", help="check cluster config files; name the file, field and reason of each error")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_validate)
    gate_cmd.register(sub)
    audit_cmd.register(sub)
    keys_cmd.register(sub)
    add_plugin_commands(sub)
    return parser


def add_plugin_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Commands that other packages register under the ``slmctl.commands`` entry-point group.

    The kernel may not import the packages above it (``router_models``, ``autoscaling``),
    so they plug their commands in: each entry point is a ``register(subparsers)`` that
    adds a subcommand whose ``func(args) -> int`` does the work. A plug-in that cannot be
    imported (a stale install, a missing optional extra) is named on stderr and skipped, so
    that one broken command does not take every other command down with it.
    """
    for entry in sorted(metadata.entry_points(group="slmctl.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as err:
            print(f"slmctl: skipping the {entry.name!r} commands ({entry.value}): {err}", file=sys.stderr)
            continue
        register(sub)


def exit_code(err: SLMError) -> int:
    """Bad input to a command (a data file, a flag value: a 4xx error) is exit 2, since
    running it again cannot help; a service that is down or failing (Redis unreachable, a
    5xx or retryable error) is exit 1, like any other failure worth retrying later."""
    if isinstance(err, ConfigError):
        return EXIT_BAD_CONFIG
    if err.retryable or err.http_status >= 500:
        return EXIT_FAILED
    return EXIT_BAD_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except SLMError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return exit_code(err)
    except RayClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; anything deployed keeps running (`slmctl status`, `slmctl down`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
