"""The shipped router's bf16 embedder multiplied in bfloat16 against float32 on this CPU:
speed, how far the embeddings move, and whether the router decides the same
(docs/router.md, CPU precision).

    .venv/bin/python benchmarks/embedder_compute.py [--prompts 200] [--threads 1]

Prompts: the project's own labelled ShareGPT chat prompts (none from the reserved ids) and
every 40th MMLU training question, so both chat and exam traffic are in the sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import islice
from pathlib import Path

import numpy as np

from router_models.artifact import DEFAULT_ARTIFACT, TUNED_PREFIX, load_artifact
from router_models.embedder import Embedder, cpu_has_native_bf16
from router_models.heads import predict

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "router_models" / "data" / "sharegpt_chat_labels.jsonl"
MMLU = ROOT.parent / "shared" / "data" / "router" / "mmlu_train.jsonl"


def prompts(n: int) -> list[str]:
    chat = [json.loads(line)["prompt"] for line in islice(CHAT.open(), n // 2)]
    exam = [json.loads(line)["prompt"] for i, line in enumerate(MMLU.open()) if i % 40 == 0] if MMLU.is_file() else []
    return chat + exam[: n - len(chat)]


def timed(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, float, float]:
    """(embeddings, p50 ms one prompt at a time, ms per prompt in batches of 32)."""
    singles = []
    for text in texts:
        started = time.perf_counter()
        embedder.embed([text])
        singles.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    out = embedder.embed(texts, batch_size=32)
    return out, statistics.median(singles), (time.perf_counter() - started) * 1000 / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    artifact = load_artifact(DEFAULT_ARTIFACT)
    texts = prompts(args.prompts)
    print(f"artifact {artifact.metadata.get('version')}, {len(texts)} prompts, {args.threads} thread(s), "
          f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    results = {}
    for compute in ("bfloat16", "float32"):
        embedder = Embedder(dtype="bfloat16", compute=compute, threads=args.threads, max_tokens=int(artifact.embedder.get("max_tokens", 256)),
                            head_tokens=artifact.embedder.get("head_tokens"), context_tokens=int(artifact.embedder.get("context_tokens", 0)))
        embedder.use_tuned_layers(artifact.arrays, TUNED_PREFIX)
        embedder.embed(texts[:4])  # warm
        results[compute] = out, single, batched = timed(embedder, texts)
        print(f"compute {compute:8}  one at a time p50 {single:6.1f} ms   batches of 32 {batched:6.1f} ms/prompt")
    a, b = results["bfloat16"][0], results["float32"][0]
    cos = (a * b).sum(1)
    pa, pb = predict(artifact.arrays, a, texts), predict(artifact.arrays, b, texts)
    print(f"cosine bf16 vs float32 compute: min {cos.min():.6f} mean {cos.mean():.6f}")
    print(f"same domain: {(pa.domain_probs.argmax(1) == pb.domain_probs.argmax(1)).mean():.4f}   "
          f"escalation score |diff| max {np.abs(pa.escalation - pb.escalation).max():.4f}")
    print(f"speed-up float32 over bf16: one at a time {results['bfloat16'][1] / results['float32'][1]:.2f}x, "
          f"batched {results['bfloat16'][2] / results['float32'][2]:.2f}x")


if __name__ == "__main__":
    main()
