"""``slmctl router ...``: train, calibrate, score and evaluate the router micro-model.

Registered into slmctl through the ``slmctl.commands`` entry point (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from router_models.artifact import DEFAULT_ARTIFACT
from router_models.queries import INPUT_HELP


def _train(args: argparse.Namespace) -> int:
    from router_models.train import TrainSettings, train

    defaults = TrainSettings()
    settings = TrainSettings(
        seed=args.seed, max_rows=args.max_rows, target_quality=args.target_quality,
        tune_layers=defaults.tune_layers if args.tune_layers is None else args.tune_layers,
        tune_epochs=defaults.tune_epochs if args.tune_epochs is None else args.tune_epochs,
        head_tokens=defaults.head_tokens if args.head_tokens is None else (None if args.head_tokens < 0 else args.head_tokens),
        context_tokens=defaults.context_tokens if args.context_tokens is None else args.context_tokens,
    )
    print(f"training on {', '.join(args.data)} (seed {args.seed}) ...", file=sys.stderr, flush=True)
    artifact = train(args.data, args.out, settings)
    val = artifact.metadata["validation"]
    print(json.dumps({"artifact": str(args.out), "version": artifact.metadata["version"], "threshold": artifact.escalation_threshold,
                      "validation": {k: v for k, v in val.items() if k != "random"}}, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from router_models.calibrate import calibrate

    thresholds = calibrate(args.artifact, args.data, target_rate=args.target_escalation_rate, target_quality=args.target_quality,
                           per_domain=args.per_domain)
    print(json.dumps({"artifact": str(args.artifact), "escalation_threshold": thresholds["escalation"],
                      "by_domain": thresholds.get("by_domain", {})}))
    return 0


def _config(args: argparse.Namespace):  # -> ClusterConfig
    from cluster.loader import resolve_config

    return resolve_config(profile=None if args.config else args.profile, path=args.config)


def _score(args: argparse.Namespace) -> int:
    from cluster.routing import decide_auto
    from router_models.queries import read_queries
    from router_models.trained import TrainedRouter

    cfg = _config(args)
    router = TrainedRouter(args.artifact)
    router.load()
    queries = read_queries(args.input)
    with Path(args.output).open("w", encoding="utf-8") as out:
        for start in range(0, len(queries), 256):
            for s in router.score(queries[start : start + 256]):
                decision = decide_auto(cfg, s)
                route = {"model": decision.model, "version": decision.version, "reason": decision.reason,
                         "escalates": s.escalation_score >= decision.escalation_threshold}
                out.write(json.dumps({"domain": s.domain, "domain_probs": s.domain_probs, "escalation_score": s.escalation_score,
                                      "route": route}) + "\n")
            print(f"scored {min(start + 256, len(queries))}/{len(queries)}", file=sys.stderr, flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from router_models.data import file_sha256, read_jsonl, split
    from router_models.evaluate import evaluate_embedded
    from router_models.trained import load_with_embedder

    artifact, embedder = load_with_embedder(args.artifact)
    examples = read_jsonl(args.data)
    digest = file_sha256(Path(args.data))
    trained_on = any(d.get("sha256") == digest for d in artifact.metadata.get("data", []))
    note = None
    if trained_on and not args.all_rows:
        meta = artifact.metadata["train"]
        _, examples = split(examples, meta["seed"], meta["validation_share"])
        note = (f"{Path(args.data).name} is one of this artifact's training files: evaluating only its validation split "
                f"({len(examples)} rows the artifact was not trained on; --all-rows to override)")
    elif trained_on:
        note = f"WARNING: {Path(args.data).name} is one of this artifact's training files; these figures include its training rows"
    if note:
        print(note, file=sys.stderr)
    if not examples:
        print("no rows to evaluate", file=sys.stderr)
        return 1
    min_conf = _config(args).router.min_domain_confidence
    report = evaluate_embedded(artifact.arrays, artifact.metadata, examples, embedder.embed([ex.prompt for ex in examples]), min_conf)
    report["artifact"] = {"path": str(args.artifact), "version": artifact.metadata.get("version")}
    if note:
        report["note"] = note
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_report(report: dict) -> str:
    lines = [f"artifact {report['artifact']['version']}  rows {report['rows']}"]
    if "domain_accuracy" in report:
        lines.append(f"domain accuracy          {report['domain_accuracy']:.4f}  ({report['domain_rows']} labelled)")
    if "exam_domain_accuracy" in report:
        lines.append(f"MMLU+GSM8K domain acc.   {report['exam_domain_accuracy']:.4f}")
    if "mmlu_domain_accuracy" in report:
        lines.append(f"MMLU domain accuracy     {report['mmlu_domain_accuracy']:.4f}  ({report['mmlu_rows']} prompts)")
    if "gsm8k_math_share" in report:
        lines.append(f"GSM8K-style -> math      {report['gsm8k_math_share']:.4f}  ({report['gsm8k_rows']} prompts)")
    if "chat" in report:
        lines.extend(_chat_lines(report["chat"], report["min_domain_confidence"]))
    if "router" in report:
        lines.append("")
        lines.append(f"{'router':<14} {'APGR':>6} {'CPT(50%)':>9} {'CPT(80%)':>9} {'frontier share @95%':>20} {'cost reduction @95%':>20}")
        for key in ("router", "subject_prior", "random"):
            r = report[key]
            lines.append(f"{key:<14} {_f(r['apgr']):>6} {_f(r['cpt50']):>9} {_f(r['cpt80']):>9} {_f(r['share_for_95']):>20} "
                         f"{_f(r['cost_reduction_at_95']):>20}")
        at = report["router"].get("at_threshold")
        if at:
            lines.append(f"at the artifact's threshold: {at['frontier_share']:.1%} of these prompts go to the frontier, "
                         f"{at['quality_vs_frontier']:.1%} of frontier-only quality")
    elif "cost_quality" in report:
        lines.append(f"APGR, CPT, cost reduction: n/a ({report['cost_quality']})")
    return "\n".join(lines)


def _chat_lines(chat: dict, min_conf: float) -> list[str]:
    esc = chat["escalation"]
    lines = [f"chat domain accuracy     {chat['domain_accuracy']:.4f}  ({chat['rows']} prompts; "
             f"{chat['routed_accuracy']:.4f} after min_domain_confidence {min_conf})",
             f"{'chat domain':<12} {'precision':>9} {'recall':>7} {'support':>8}   {'routed precision':>16} {'routed recall':>13}"]
    for d, r in chat["per_domain"].items():
        routed = chat["routed_per_domain"][d]
        lines.append(f"{d:<12} {_f(r['precision']):>9} {_f(r['recall']):>7} {r['support']:>8}   {_f(routed['precision']):>16} "
                     f"{_f(routed['recall']):>13}")
    lines.append(f"chat escalation score    p10 {esc['p10']:.3f}  p25 {esc['p25']:.3f}  p50 {esc['p50']:.3f}  p75 {esc['p75']:.3f}  "
                 f"p90 {esc['p90']:.3f}")
    lines.append(f"chat prompts escalated   {esc['share_escalated']:.1%} at the artifact's thresholds (global {esc['threshold']:.3f})"
                 + (f"; {esc['share_escalated_at_exam_threshold']:.1%} at the exam (95% quality) threshold {esc['exam_threshold']:.3f}"
                    if "exam_threshold" in esc else ""))
    if esc.get("share_escalated_by_domain"):
        lines.append("  by predicted domain     " + "  ".join(f"{d} {v:.1%}" for d, v in esc["share_escalated_by_domain"].items()))
    return lines


def _config_args(parser: argparse.ArgumentParser) -> None:
    from cluster.loader import PROFILES

    group = parser.add_mutually_exclusive_group()
    group.add_argument("--profile", default="local", choices=PROFILES,
                       help="cluster profile whose router.min_domain_confidence and models decide the route (default local)")
    group.add_argument("--config", help="cluster config file, instead of a profile")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    router = sub.add_parser("router", help="train, calibrate, score and evaluate the router micro-model")
    rsub = router.add_subparsers(dest="router_command", required=True)

    train = rsub.add_parser("train", help="train heads over all-MiniLM-L6-v2 and write a versioned artifact")
    train.add_argument("--data", nargs="+", required=True, help="JSON-lines files shaped like ../shared/data/router")
    train.add_argument("--out", required=True, help="artifact folder to write")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-rows", type=int, help="train on a deterministic subsample (quick runs)")
    train.add_argument("--target-quality", type=float, default=0.95, help="default threshold: this share of frontier-only quality on validation")
    train.add_argument("--tune-layers", type=int, help="embedder top layers to tune for the domain (0: keep it frozen; default from TrainSettings)")
    train.add_argument("--tune-epochs", type=int, help="epochs of that tuning")
    train.add_argument("--head-tokens", type=int, help="tokens kept from a long request's start, the rest from its end (-1: start only)")
    train.add_argument("--context-tokens", type=int, help="most tokens of earlier user turns in the router's window")
    train.set_defaults(func=_train)

    cal = rsub.add_parser("calibrate", help="set the escalation threshold from a sample of traffic")
    cal.add_argument("--artifact", required=True)
    cal.add_argument("--data", required=True)
    goal = cal.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-escalation-rate", type=float, help="share of requests to send to the frontier")
    goal.add_argument("--target-quality", type=float, help="share of frontier-only quality to reach (needs correctness labels)")
    cal.add_argument("--per-domain", action="store_true",
                     help="also one threshold per predicted domain, each escalating that share of its domain (rate only)")
    cal.set_defaults(func=_calibrate)

    score = rsub.add_parser(
        "score", help="score prompts or conversations: one JSON line out per line in",
        description="Score each input line. Output, one line per input line in order: domain, domain_probs, "
                    "escalation_score, and route: where the gateway sends it as model auto under the config "
                    "(model, version, reason, and whether the escalation score clears its threshold).")
    score.add_argument("--artifact", default=str(DEFAULT_ARTIFACT), help="artifact folder (default: the shipped one)")
    score.add_argument("--input", required=True, help=INPUT_HELP)
    score.add_argument("--output", required=True, help="JSON-lines file to write")
    _config_args(score)
    score.set_defaults(func=_score)

    ev = rsub.add_parser("eval", help="domain accuracy and RouteLLM cost-quality figures vs random and per-subject prior")
    ev.add_argument("--artifact", default=str(DEFAULT_ARTIFACT), help="artifact folder (default: the shipped one)")
    ev.add_argument("--data", required=True)
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.add_argument("--all-rows", action="store_true", help="evaluate every row even when the artifact was trained on this file")
    _config_args(ev)
    ev.set_defaults(func=_eval)
