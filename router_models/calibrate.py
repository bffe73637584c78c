"""Set an artifact's escalation threshold from a sample of traffic (RouteLLM-style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cluster.errors import InvalidRequestError
from router_models.artifact import METADATA
from router_models.data import read_jsonl
from router_models.evaluate import threshold_for_rate, threshold_for_scores_quality, thresholds_by_domain
from router_models.heads import predict
from router_models.trained import load_with_embedder


def calibrate(artifact_dir: str | Path, data: str | Path, *, target_rate: float | None = None, target_quality: float | None = None,
              per_domain: bool = False) -> dict[str, Any]:
    """Write the threshold that sends ``target_rate`` of this traffic to the frontier, or that
    reaches ``target_quality`` x frontier-only quality (needs correctness labels); with
    ``per_domain`` (rate only), also one threshold per predicted domain, each sending
    ``target_rate`` of that domain's traffic. Returns the new ``thresholds`` block."""
    if (target_rate is None) == (target_quality is None):
        raise InvalidRequestError("give exactly one of --target-escalation-rate or --target-quality")
    if per_domain and target_rate is None:
        raise InvalidRequestError("--per-domain needs --target-escalation-rate")
    artifact, embedder = load_with_embedder(artifact_dir)
    examples = read_jsonl(data)
    if not examples:
        raise InvalidRequestError(f"{data} holds no prompts")
    texts = [ex.prompt for ex in examples]
    heads = predict(artifact.arrays, embedder.embed(texts), texts)
    scores = heads.escalation
    if target_rate is not None:
        threshold = threshold_for_rate(scores, target_rate)
        how = f"target_escalation_rate={target_rate} on {Path(data).name} ({len(examples)} prompts)"
    else:
        labelled = [i for i, ex in enumerate(examples) if ex.has_correctness]
        if len(labelled) < 10:
            raise InvalidRequestError("--target-quality needs at least 10 lines with weak_correct and strong_correct")
        weak = np.array([bool(examples[i].weak_correct) for i in labelled])
        strong = np.array([bool(examples[i].strong_correct) for i in labelled])
        found = threshold_for_scores_quality(scores[labelled], weak, strong, float(target_quality))
        if found is None:
            raise InvalidRequestError(f"no threshold reaches {target_quality} of frontier-only quality on this data")
        threshold = found
        how = f"target_quality={target_quality} on {Path(data).name} ({len(labelled)} labelled prompts)"
    metadata = dict(artifact.metadata)
    thresholds: dict[str, Any] = {"escalation": threshold, "calibrated": how, "escalation_rate_on_sample": float(np.mean(scores >= threshold))}
    if "exam_quality_threshold" in artifact.metadata["thresholds"]:
        thresholds["exam_quality_threshold"] = artifact.metadata["thresholds"]["exam_quality_threshold"]
    if per_domain:
        predicted = [artifact.domains[i] for i in heads.domain_probs.argmax(axis=1)]
        thresholds["by_domain"] = thresholds_by_domain(scores, predicted, float(target_rate))  # type: ignore[arg-type]
        thresholds["calibrated"] = how + ", overall and per predicted domain"
    metadata["thresholds"] = thresholds
    # Only the metadata changes; the weights stay byte-identical.
    import json

    (Path(artifact_dir) / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return thresholds
