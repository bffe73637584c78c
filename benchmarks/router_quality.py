"""The router's quality targets on the validation split it was tuned on.

Cuts the same validation split as training (``router_models.data.split``, seed and share
from the artifact's metadata) out of the data files, evaluates the artifact on it, and
checks the targets: on MMLU + GSM8K, domain accuracy >= 92% (the figure earlier sessions
reported; MMLU alone is printed too), cost reduction at 95% of frontier quality >= 55%,
APGR >= 0.68, GSM8K-style prompts -> math >= 95%; on the labelled ShareGPT chat prompts,
domain accuracy >= 90%, code recall >= 95% and code precision >= 90%.

    python -m benchmarks.router_quality --data ../shared/data/router/mmlu_train.jsonl \
        ../shared/data/router/gsm8k_train.jsonl router_models/data/sharegpt_chat_labels.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from router_models.artifact import DEFAULT_ARTIFACT
from router_models.cli import format_report
from router_models.data import read_many, split
from router_models.evaluate import evaluate_embedded
from router_models.train import subsample
from router_models.trained import load_with_embedder

TARGETS = (("exam_domain_accuracy", 0.92), ("mmlu_domain_accuracy", 0.92), ("gsm8k_math_share", 0.95), ("router.cost_reduction_at_95", 0.55), ("router.apgr", 0.68),
           ("chat.domain_accuracy", 0.90), ("chat.per_domain.code.recall", 0.95), ("chat.per_domain.code.precision", 0.90))


def _get(report: dict, dotted: str) -> float | None:
    value: object = report
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    artifact, embedder = load_with_embedder(args.artifact)
    train_meta = artifact.metadata["train"]
    examples = subsample(read_many(args.data), train_meta["max_rows"], train_meta["seed"])
    _, val = split(examples, train_meta["seed"], train_meta["validation_share"])
    report = evaluate_embedded(artifact.arrays, artifact.metadata, val, embedder.embed([ex.prompt for ex in val]))
    report["artifact"] = {"path": str(args.artifact), "version": artifact.metadata.get("version")}
    print(f"validation split: seed {train_meta['seed']}, share {train_meta['validation_share']}, {len(val)} prompts")
    print(format_report(report))

    print()
    ok = True
    for key, bar in TARGETS:
        value = _get(report, key)
        passed = value is not None and value >= bar
        ok &= passed
        print(f"{key:<30} {value if value is None else round(value, 4)!s:>8}  target >= {bar}  {'PASS' if passed else 'MISS'}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
