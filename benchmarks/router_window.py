"""What the router should read of a chat request: which part of a long prompt, how much of
the earlier turns, and how much the chat labels weigh. Measured with the subject (domain)
head alone, which is what these choices move; the escalation heads see the same window.

- Truncation: a request longer than the 254-token window keeps its first ``head_tokens``
  and its last ``254 - head_tokens`` tokens (``head``: the start only; ``0``: the end only).
- Context: second user turns of labelled validation conversations, scored alone and with
  the first turn as context (``context_tokens``). Gold is the conversation's label (of
  its first turn): a follow-up usually stays in its conversation's domain.
- ``chat_weight``: the weight of a chat row against an MMLU or GSM8K row in the subject head.

    python -m benchmarks.router_window --data ../shared/data/router/mmlu_train.jsonl \\
        ../shared/data/router/gsm8k_train.jsonl router_models/data/sharegpt_chat_labels.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cluster.config import DOMAINS
from cluster.types import RouteQuery
from router_models.artifact import load_artifact
from router_models.data import GSM8K_SUBJECT, Example, is_chat, read_many, split
from router_models.embedder import Embedder
from router_models.evaluate import per_domain
from router_models.fitting import TrainSettings, _logreg


def fit_domain_head(train: list[Example], X: np.ndarray, chat_weight: float, seed: int = 0):
    weights = np.array([chat_weight if is_chat(ex) else 1.0 for ex in train])
    model = _logreg(TrainSettings().subject_C, seed).fit(X, [ex.subject for ex in train], sample_weight=weights)
    domain_of = {ex.subject: ex.domain for ex in train}
    return lambda Z: [domain_of[s] for s in model.predict(Z)]


def figures(predict, val: list[Example], X: np.ndarray, long_mask: np.ndarray) -> dict[str, float]:
    pred = predict(X)
    chat = np.array([is_chat(ex) for ex in val])
    gold = [ex.domain for ex in val]
    mmlu = np.array([ex.has_correctness for ex in val])
    gsm = np.array([ex.subject == GSM8K_SUBJECT for ex in val])
    ok = np.array([p == g for p, g in zip(pred, gold)])
    code = per_domain([p for p, c in zip(pred, chat) if c], [g for g, c in zip(gold, chat) if c], DOMAINS)["code"]
    return {"chat_acc": ok[chat].mean(), "chat_long_acc": ok[chat & long_mask].mean() if (chat & long_mask).any() else float("nan"),
            "code_recall": code["recall"], "code_precision": code["precision"], "mmlu_acc": ok[mmlu].mean(),
            "gsm8k_math": np.mean([p == "math" for p, g in zip(pred, gsm) if g])}


def follow_ups(val: list[Example], labelled_ids: dict[str, str]) -> list[tuple[RouteQuery, str]]:
    """(second user turn with the first as context, conversation label) for validation chat rows."""
    from router_models.sharegpt import iter_conversations

    wanted = {labelled_ids[ex.prompt]: ex.domain for ex in val if is_chat(ex) and ex.prompt in labelled_ids}
    out = []
    for conv in iter_conversations():
        if conv.id in wanted:
            users = [t.text for t in conv.turns if t.role == "user" and t.text.strip()]
            if len(users) >= 2:
                out.append((RouteQuery(users[1], (users[0],)), wanted[conv.id]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--head-tokens", nargs="+", default=["head", "0", "64", "128", "192"])
    parser.add_argument("--chat-weight", nargs="+", type=float, default=[1.0])
    parser.add_argument("--context-tokens", nargs="+", type=int, default=[0, 32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", type=Path, help="embed with this router artifact's tuned layers, or an .npz of them (default: the frozen embedder)")
    args = parser.parse_args()
    tuned = (dict(np.load(args.artifact)) if args.artifact.suffix == ".npz" else load_artifact(args.artifact).arrays) if args.artifact else None

    def embedder(**kw) -> Embedder:
        e = Embedder(**kw).load()
        if tuned is not None:
            e.use_tuned_layers(tuned)
        return e

    examples = read_many(args.data)
    train, val = split(examples, args.seed, 0.2)
    base = embedder()
    room = base.max_tokens - 2

    def over(rows: list[Example]) -> np.ndarray:
        return np.array([len(ids) > room for ids in base._encode([ex.prompt for ex in rows])])

    long_train, long_mask = over(train), over(val)
    print(f"seed {args.seed}: {len(train)} train, {len(val)} validation prompts; over the {room}-token window: "
          f"{int(long_train.sum())} train, {int(sum(long_mask[i] for i, ex in enumerate(val) if is_chat(ex)))} of "
          f"{sum(is_chat(ex) for ex in val)} validation chat prompts")
    t0 = time.perf_counter()
    X_train_head, X_val_head = base.embed([ex.prompt for ex in train]), base.embed([ex.prompt for ex in val])
    print(f"embedded in {time.perf_counter() - t0:.0f} s")

    def variant(emb: Embedder, X: np.ndarray, rows: list[Example], long: np.ndarray) -> np.ndarray:
        """Only prompts over the window embed differently; the others keep their rows."""
        X = X.copy()
        X[long] = emb.embed([ex.prompt for ex, is_long in zip(rows, long) if is_long])
        return X

    print(f"\n{'head_tokens':<12} {'chat_weight':>11} {'chat_acc':>9} {'chat_long':>9} {'code_rec':>9} {'code_prec':>9} {'mmlu_acc':>9} {'gsm8k':>7}")
    best = None
    for head in args.head_tokens:
        if head == "head":
            Xt, Xv = X_train_head, X_val_head
        else:
            emb = embedder(head_tokens=int(head))
            Xt, Xv = variant(emb, X_train_head, train, long_train), variant(emb, X_val_head, val, long_mask)
        for w in args.chat_weight:
            predict = fit_domain_head(train, Xt, w, args.seed)
            f = figures(predict, val, Xv, long_mask)
            print(f"{head:<12} {w:>11} {f['chat_acc']:>9.4f} {f['chat_long_acc']:>9.4f} {f['code_recall']:>9.4f} "
                  f"{f['code_precision']:>9.4f} {f['mmlu_acc']:>9.4f} {f['gsm8k_math']:>7.4f}", flush=True)
            if head == args.head_tokens[0] and best is None:
                best = predict

    ids = {json.loads(line)["prompt"]: json.loads(line)["id"] for p in args.data if "chat" in p.name for line in p.open()}
    pairs = follow_ups(val, ids)
    print(f"\nfollow-ups: {len(pairs)} second user turns of validation conversations (gold: the conversation's label)")
    print(f"{'context_tokens':<15} {'accuracy':>9}")
    for ctx in args.context_tokens:
        emb = embedder(context_tokens=ctx)
        pred = best(emb.embed([q for q, _ in pairs]))
        print(f"{ctx:<15} {np.mean([p == g for p, (_, g) in zip(pred, pairs)]):>9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
