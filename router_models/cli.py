"""``slmctl router ...``: train, calibrate, score and evaluate the router micro-model.

Registered into slmctl through the ``slmctl.commands`` entry point (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from router_models.artifact import DEFAULT_ARTIFACT


def _train(args: argparse.Namespace) -> int:
    from router_models.train import TrainSettings, train

    settings = TrainSettings(seed=args.seed, max_rows=args.max_rows, target_quality=args.target_quality)
    print(f"training on {', '.join(args.data)} (seed {args.seed}) ...", file=sys.stderr, flush=True)
    artifact = train(args.data, args.out, settings)
    val = artifact.metadata["validation"]
    print(json.dumps({"artifact": str(args.out), "version": artifact.metadata["version"], "threshold": artifact.escalation_threshold,
                      "validation": {k: v for k, v in val.items() if k != "random"}}, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from router_models.calibrate import calibrate

    threshold = calibrate(args.artifact, args.data, target_rate=args.target_escalation_rate, target_quality=args.target_quality)
    print(json.dumps({"artifact": str(args.artifact), "escalation_threshold": threshold}))
    return 0


def _score(args: argparse.Namespace) -> int:
    from router_models.data import read_jsonl
    from router_models.trained import TrainedRouter

    router = TrainedRouter(args.artifact)
    router.load()
    prompts = [ex.prompt for ex in read_jsonl(args.input)]
    with Path(args.output).open("w", encoding="utf-8") as out:
        for start in range(0, len(prompts), 256):
            for s in router.score(prompts[start : start + 256]):
                out.write(json.dumps({"domain": s.domain, "domain_probs": s.domain_probs, "escalation_score": s.escalation_score}) + "\n")
            print(f"scored {min(start + 256, len(prompts))}/{len(prompts)}", file=sys.stderr, flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from router_models.data import read_jsonl
    from router_models.evaluate import evaluate_embedded
    from router_models.trained import load_with_embedder

    artifact, embedder = load_with_embedder(args.artifact)
    examples = read_jsonl(args.data)
    report = evaluate_embedded(artifact.arrays, artifact.metadata, examples, embedder.embed([ex.prompt for ex in examples]))
    report["artifact"] = {"path": str(args.artifact), "version": artifact.metadata.get("version")}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    lines = [f"artifact {report['artifact']['version']}  rows {report['rows']}"]
    if "domain_accuracy" in report:
        lines.append(f"domain accuracy          {report['domain_accuracy']:.4f}  ({report['domain_rows']} labelled)")
    if "gsm8k_math_share" in report:
        lines.append(f"GSM8K-style -> math      {report['gsm8k_math_share']:.4f}  ({report['gsm8k_rows']} prompts)")
    if "router" in report:
        lines.append("")
        lines.append(f"{'router':<14} {'APGR':>6} {'CPT(50%)':>9} {'CPT(80%)':>9} {'frontier share @95%':>20} {'cost reduction @95%':>20}")
        for key in ("router", "subject_prior", "random"):
            r = report[key]

            def f(v: float | None) -> str:
                return "n/a" if v is None else f"{v:.3f}"

            lines.append(f"{key:<14} {f(r['apgr']):>6} {f(r['cpt50']):>9} {f(r['cpt80']):>9} {f(r['share_for_95']):>20} {f(r['cost_reduction_at_95']):>20}")
    return "\n".join(lines)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    router = sub.add_parser("router", help="train, calibrate, score and evaluate the router micro-model")
    rsub = router.add_subparsers(dest="router_command", required=True)

    train = rsub.add_parser("train", help="train heads over all-MiniLM-L6-v2 and write a versioned artifact")
    train.add_argument("--data", nargs="+", required=True, help="JSON-lines files shaped like ../shared/data/router")
    train.add_argument("--out", required=True, help="artifact folder to write")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-rows", type=int, help="train on a deterministic subsample (quick runs)")
    train.add_argument("--target-quality", type=float, default=0.95, help="default threshold: this share of frontier-only quality on validation")
    train.set_defaults(func=_train)

    cal = rsub.add_parser("calibrate", help="set the escalation threshold from a sample of traffic")
    cal.add_argument("--artifact", required=True)
    cal.add_argument("--data", required=True)
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-escalation-rate", type=float, help="share of requests to send to the frontier")
    goal.add_argument("--target-quality", type=float, help="share of frontier-only quality to reach (needs correctness labels)")
    cal.set_defaults(func=_calibrate)

    score = rsub.add_parser("score", help="score prompts: one JSON line out per line in")
    score.add_argument("--artifact", default=str(DEFAULT_ARTIFACT), help="artifact folder (default: the shipped one)")
    score.add_argument("--input", required=True)
    score.add_argument("--output", required=True)
    score.set_defaults(func=_score)

    ev = rsub.add_parser("eval", help="domain accuracy and RouteLLM cost-quality figures vs random and per-subject prior")
    ev.add_argument("--artifact", default=str(DEFAULT_ARTIFACT), help="artifact folder (default: the shipped one)")
    ev.add_argument("--data", required=True)
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_eval)
