"""What /v1/embeddings' stock all-MiniLM-L6-v2 costs the router replica, beside the trained
router's tuned copy: load time, resident memory, latency, and how far the tuned layers
move the embedding (docs/endpoints.md).

    .venv/bin/python benchmarks/embedder_cost.py
"""

from __future__ import annotations

import re
import time

from router_models.embedder import Embedder
from router_models.trained import TrainedRouter

PAIR = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024  # type: ignore[union-attr]


def main() -> None:
    router = TrainedRouter(threads=1)
    router.load()
    before = rss_mib()
    started = time.perf_counter()
    stock = Embedder(max_tokens=256, head_tokens=None, context_tokens=0, threads=1, dtype="float32").load()
    loaded_s = time.perf_counter() - started
    stock.embed(PAIR)
    print(f"router alone: {before:.0f} MiB; stock embedder: load {loaded_s:.2f} s, +{rss_mib() - before:.0f} MiB")
    for n in (1, 32):
        batch = [f"sentence number {i} about the capital of France and its history" for i in range(n)]
        stock.embed(batch)
        started = time.perf_counter()
        for _ in range(5):
            stock.embed(batch)
        print(f"{n} input(s): {(time.perf_counter() - started) / 5 * 1000:.1f} ms")
    a, b = stock.embed(PAIR), router.embedder.embed(PAIR)  # type: ignore[union-attr]
    print(f"stock: similar {a[0] @ a[1]:.2f}, unrelated {a[0] @ a[2]:.2f}; tuned: similar {b[0] @ b[1]:.2f}, "
          f"unrelated {b[0] @ b[2]:.2f}; same text stock vs tuned {a[0] @ b[0]:.2f}")


if __name__ == "__main__":
    main()
