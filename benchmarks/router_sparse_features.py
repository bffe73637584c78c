"""Does a bag of words or character n-grams beside the tuned embedding route chat better?

A lever for the chat targets of docs/router.md (code/general confusions): the embedding
may blur the surface signs of code (``def``, ``{``, ``SELECT``) that a sparse TF-IDF
vector keeps. The subject head (multinomial logistic regression over MMLU subjects,
``gsm8k`` and the ``chat:<domain>`` labels, chat rows weighing 2, as training does) is
fitted on the shipped artifact's embeddings alone and with each TF-IDF vector appended
(scaled by ``alpha``), and judged on the seed's validation split.

    python -m benchmarks.router_sparse_features --data ../shared/data/router/mmlu_train.jsonl \\
        ../shared/data/router/gsm8k_train.jsonl router_models/data/sharegpt_chat_labels.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from router_models.artifact import DEFAULT_ARTIFACT
from router_models.data import GSM8K_SUBJECT, Example, is_chat, read_many, split
from router_models.fitting import TrainSettings, _logreg
from router_models.trained import load_with_embedder


def clip(text: str) -> str:
    """The head and tail of a long prompt, like the embedder's window."""
    return text if len(text) < 3000 else f"{text[:2000]} {text[-1000:]}"


def domain_predictions(train: list[Example], Xt, Xv, seed: int) -> np.ndarray:  # noqa: ANN001 - dense or sparse
    weights = np.array([2.0 if is_chat(ex) else 1.0 for ex in train])
    model = _logreg(TrainSettings().subject_C, seed).fit(Xt, [ex.subject for ex in train], sample_weight=weights)
    domain_of = {ex.subject: ex.domain for ex in train}
    return np.array([domain_of[s] for s in model.predict(Xv)])


def figures(pred: np.ndarray, val: list[Example]) -> str:
    gold = np.array([ex.domain for ex in val])
    chat = np.array([is_chat(ex) for ex in val])
    mmlu = np.array([ex.has_correctness for ex in val])
    gsm = np.array([ex.subject == GSM8K_SUBJECT for ex in val])
    hit = (pred == "code") & (gold == "code") & chat
    recall, precision = hit.sum() / ((gold == "code") & chat).sum(), hit.sum() / ((pred == "code") & chat).sum()
    ok = pred == gold
    return f"{ok[chat].mean():>9.4f} {recall:>9.4f} {precision:>9.4f} {ok[mmlu].mean():>9.4f} {(pred[gsm] == 'math').mean():>7.4f}"


def main() -> int:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument("--alpha", nargs="+", type=float, default=[0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, val = split(read_many(args.data), args.seed, 0.2)
    artifact, embedder = load_with_embedder(args.artifact)
    t0 = time.perf_counter()
    Xt, Xv = embedder.embed([ex.prompt for ex in train]), embedder.embed([ex.prompt for ex in val])
    print(f"{artifact.metadata.get('version')}: {len(train)} train, {len(val)} validation prompts "
          f"({sum(map(is_chat, val))} chat); embedded in {time.perf_counter() - t0:.0f} s")
    print(f"\n{'features':<28} {'chat_acc':>9} {'code_rec':>9} {'code_prec':>9} {'mmlu_acc':>9} {'gsm8k':>7}")
    print(f"{'embedding':<28} {figures(domain_predictions(train, Xt, Xv, args.seed), val)}", flush=True)
    vectorizers = {
        "words 1-2": TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000, sublinear_tf=True,
                                     token_pattern=r"(?u)\b\w+\b|[{}()\[\];=<>#$]"),  # code punctuation is a word here
        "chars 2-5": TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=3, max_features=150_000, sublinear_tf=True),
    }
    for name, vec in vectorizers.items():
        Tt, Tv = vec.fit_transform([clip(ex.prompt) for ex in train]), vec.transform([clip(ex.prompt) for ex in val])
        for alpha in args.alpha:
            pred = domain_predictions(train, sparse.hstack([sparse.csr_matrix(Xt), alpha * Tt]).tocsr(),
                                      sparse.hstack([sparse.csr_matrix(Xv), alpha * Tv]).tocsr(), args.seed)
            print(f"{f'embedding + {name} (a={alpha})':<28} {figures(pred, val)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
