"""``slmctl gate calibrate``: set the quality gate's pass bar from labelled answers."""

from __future__ import annotations

import argparse
import json
import sys

from cluster import gate
from cluster.errors import InvalidRequestError
from cluster.jsonl import json_lines
from cluster.loader import PROFILES, resolve_config

CALIBRATE_HELP = """Each line of --data is one small-model answer, labelled:
  {"features": {"tokens": 57, "mean_logprob": -0.21, "low_prob": 0.64}, "correct": true}
tokens: the answer's length in tokens; mean_logprob: the mean token logprob; low_prob: the
gate's low quantile of token probabilities (gate.quantile: 0.1 unless configured; 0 = the
minimum). The gate's score is computed with the config's gate weights, so calibrate with
the config you serve."""


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    g = sub.add_parser("gate", help="the cascade/race quality gate")
    gsub = g.add_subparsers(dest="gate_command", required=True)
    cal = gsub.add_parser(
        "calibrate",
        help="set gate.pass_bar from labelled answers",
        description=CALIBRATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument("--data", required=True, help="JSON lines of {features, correct}")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-escalation-rate", type=float, help="share of answers to escalate, in [0, 1]")
    target.add_argument("--target-quality", type=float, help="share of passing answers that must be correct, in [0, 1]")
    src = cal.add_mutually_exclusive_group()
    src.add_argument("--profile", default="local", choices=PROFILES, help="whose gate weights (default: local)")
    src.add_argument("--config", help="a cluster config file")
    cal.add_argument("--json", action="store_true", help="print the result as JSON")
    cal.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    for name in ("target_escalation_rate", "target_quality"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    cfg = resolve_config(profile=None if args.config else args.profile, path=args.config)
    scored = []
    for where, record in json_lines(args.data):
        if not isinstance(record, dict):
            raise InvalidRequestError(f"{where}: need a JSON object")
        feats, correct = gate.record_features(record, where)
        scored.append((gate.score(feats, cfg.strategy.gate), correct))
    result = gate.calibrate(scored, target_escalation_rate=args.target_escalation_rate, target_quality=args.target_quality)
    if args.json:
        print(json.dumps(result.__dict__))
        return 0
    out = sys.stdout
    out.write(f"records:          {result.records}\n")
    out.write(f"pass bar:         {result.bar:.4f}\n")
    out.write(f"escalation rate:  {result.escalation_rate:.3f}\n")
    out.write(f"quality passing:  {result.quality:.3f}\n")
    out.write(f"\nIn the cluster config:\n  strategy:\n    gate:\n      pass_bar: {result.bar:.4f}\n")
    return 0
