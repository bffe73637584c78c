"""The ShareGPT reader, the labelling helpers and the shipped chat labels."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from cluster.config import DOMAINS
from router_models.chat_labels import CHAT_LABELS, cohen_kappa, dump_line, main as chat_labels_main, read_labels, sheet_text
from router_models.data import read_jsonl, split
from router_models.sharegpt import is_reserved, iter_conversations, training_conversations

PASS2 = CHAT_LABELS.with_name("sharegpt_chat_labels_pass2.jsonl")


def _id(reserved: bool, start: int = 0) -> str:
    """A conversation id whose sha256 does (or does not) start with 0 or 1."""
    for n in range(start, start + 10_000):
        cid = f"c{n}"
        if hashlib.sha256(cid.encode()).hexdigest()[0] in "01" if reserved else hashlib.sha256(cid.encode()).hexdigest()[0] not in "01":
            return cid
    raise AssertionError("no id found")


def _conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_reader_stops_quietly_at_the_cut_and_keeps_only_usable_conversations(tmp_path) -> None:
    kept, reserved = _id(False), _id(True)
    sibling_base = next(f"s{n}" for n in range(10_000) if is_reserved(f"s{n}_0"))
    other = _id(False, 40_000)
    convs = [
        _conv(kept, ("human", "How do I reverse a list in Python?"), ("gpt", "xs[::-1]"), ("human", "and a string?")),
        _conv(reserved, ("human", "a reserved prompt"), ("gpt", "...")),
        _conv(other, ("gpt", "opens with the model")),
        _conv(other + "x", ("human", "A Reserved   prompt"), ("gpt", "same prompt as the reserved one, another case and spacing")),
    ]
    # A part of a reserved conversation is excluded even when its own id is not reserved.
    part = next(f"{sibling_base}_{k}" for k in range(1, 500) if not is_reserved(f"{sibling_base}_{k}"))
    convs += [_conv(f"{sibling_base}_0", ("human", "part zero")), _conv(part, ("human", "a later part"))]
    text = json.dumps(convs, indent=1)
    cut = text + "\n"  # whole file
    path = tmp_path / "sharegpt.json"
    path.write_text(cut[: len(cut) - 5])  # cut inside the last object, as the wheel's copy is
    assert [c.id for c in iter_conversations(path)] == [c["id"] for c in convs[:-1]]
    usable = list(training_conversations(path))
    assert [c.id for c in usable] == [kept]
    assert [t.role for t in usable[0].turns] == ["user", "assistant", "user"]


def test_dumped_lines_survive_every_line_splitter() -> None:
    obj = {"prompt": "a\u2028b\u2029c\x85d\ne \u00e9"}
    line = dump_line(obj)
    assert line.endswith("\n") and len(line.splitlines()) == 1 and json.loads(line) == obj and "\u00e9" in line


def test_kappa_and_agreement() -> None:
    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == (1.0, 1.0)
    observed, kappa = cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"])
    assert observed == 0.5 and kappa == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cohen_kappa(["a"], [])


def test_read_labels_refuses_an_unknown_domain(tmp_path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text('{"id": "a", "domain": "code"}\n{"id": "b", "domain": "cooking"}\n')
    with pytest.raises(ValueError, match="l.jsonl:2: domain 'cooking'"):
        read_labels([path])


def test_sheet_shows_head_and_tail_of_long_prompts() -> None:
    assert sheet_text("short") == "short"
    shown = sheet_text("A" * 1200 + "B" * 3000 + "C" * 400)
    assert shown.startswith("A" * 1200) and shown.endswith("C" * 400) and "3000 characters omitted" in shown


def test_shipped_chat_labels_are_complete_and_never_reserved() -> None:
    # str.splitlines also breaks at U+2028 and friends, which the file escapes
    rows = [json.loads(line) for line in CHAT_LABELS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 2000 and len({r["id"] for r in rows}) == len(rows)
    assert not [r["id"] for r in rows if is_reserved(r["id"])]
    assert all(r["domain"] in DOMAINS and r["subject"] == f"chat:{r['domain']}" and r["prompt"].strip() for r in rows)
    counts = Counter(r["domain"] for r in rows)
    assert all(counts[d] >= 100 for d in DOMAINS), counts
    assert set(Counter(r["sample"] for r in rows)) == {"round1-random", "round1-enriched", "round2"}
    _, val = split(read_jsonl(CHAT_LABELS), seed=0)
    assert 0.15 < len(val) / len(rows) < 0.25


def test_second_pass_agreement_is_reproducible(capsys) -> None:
    first = {json.loads(line)["id"]: json.loads(line)["domain"] for line in CHAT_LABELS.read_text(encoding="utf-8").split("\n") if line}
    second = read_labels([PASS2])
    assert len(second) >= 100 and set(second) <= set(first)
    observed, kappa = cohen_kappa([first[i] for i in second], [second[i] for i in second])
    assert kappa > 0.8  # the figure docs/router.md reports is printed by the command below
    assert chat_labels_main(["agreement", str(CHAT_LABELS), str(PASS2)]) == 0
    assert f"Cohen's kappa: {kappa:.3f}" in capsys.readouterr().out


def test_a_relabel_pass_owns_each_row_once_shares_a_ring_of_prompts_and_writes_back() -> None:
    from router_models.chat_labels import apply_relabel, relabel_plan

    rows = [
        {"id": f"p{n}", "prompt": f"prompt {n}", "domain": d, "subject": f"chat:{d}", "sample": "round2"}
        for n, d in enumerate(["code", "general", "math"] * 20)
    ]
    plan = relabel_plan(rows, ["code", "general"], batches=4, overlap=2)
    assert set(plan["owner"]) == {r["id"] for r in rows if r["domain"] != "math"}  # math rows are not in the pass
    assert sorted(Counter(plan["owner"].values()).values()) == [10, 10, 10, 10]
    assert len(plan["second"]) == 8 and all(plan["second"][i] == (plan["owner"][i] - 1) % 4 for i in plan["second"])
    # every sheet's labeller says "general", except that sheet 0 says "code" for what it owns
    labels = [
        {
            i: ("code" if k == 0 and plan["owner"][i] == 0 else "general")
            for i in plan["owner"]
            if plan["owner"][i] == k or plan["second"].get(i) == k
        }
        for k in range(4)
    ]
    out, second, moved = apply_relabel(rows, plan, labels)
    assert [r["id"] for r in out] == [r["id"] for r in rows] and all(r["subject"] == f"chat:{r['domain']}" for r in out)
    assert {r["id"] for r in out if r["domain"] == "code"} == {i for i, k in plan["owner"].items() if k == 0}
    assert [r for r in out if r["domain"] == "math"] == [r for r in rows if r["domain"] == "math"]
    assert set(second) == set(plan["second"]) and sum(moved.values()) == 40
    labels[2].pop(next(i for i, k in plan["owner"].items() if k == 2))
    with pytest.raises(ValueError, match="1 prompts have no label yet"):
        apply_relabel(rows, plan, labels)
