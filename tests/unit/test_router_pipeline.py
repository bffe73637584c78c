"""The router pipeline end to end on a small synthetic data set, with the real embedder:
slmctl router train -> calibrate -> score -> eval, determinism, and serving scores."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cluster.cli.main import main
from cluster.config import DOMAINS
from cluster.types import RouteQuery
from router_models.artifact import load_artifact
from router_models.trained import TrainedRouter

TEMPLATES = {
    ("code", "college_computer_science"): ["Write a Python function that {}.", "Why does my JavaScript loop {}?", "Explain the time complexity of code that {}."],
    ("legal", "professional_law"): ["Is a contract void if {}?", "Can the plaintiff sue when {}?", "Under tort law, is the defendant liable if {}?"],
    ("medical", "clinical_knowledge"): ["A patient presents with fever and {}. What is the diagnosis?", "Which drug treats {}?"],
    ("general", "world_religions"): ["What do historians say about {}?", "Describe the culture of {}."],
}
FILLERS = ["it sorts a list", "the tenant leaves early", "a rash appears", "the river floods", "two parties disagree", "the heart rate rises",
           "a user enters bad input", "the city was founded", "the witness lies", "a bacterial infection spreads"]


def write_data(path, n_per: int = 30, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for (domain, subject), templates in TEMPLATES.items():
        for i in range(n_per):
            prompt = rng.choice(templates).format(rng.choice(FILLERS)) + f" (case {i})"
            weak = rng.random() < (0.4 if domain == "legal" else 0.8)
            lines.append({"prompt": prompt, "subject": subject, "domain": domain, "weak_correct": weak, "strong_correct": weak or rng.random() < 0.7})
    for i in range(n_per):
        lines.append({"prompt": f"Sam has {i + 3} apples and buys {i * 2 + 1} more. How many apples does Sam have now?", "domain": "math"})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("router")
    write_data(d / "train.jsonl")
    assert main(["router", "train", "--data", str(d / "train.jsonl"), "--out", str(d / "art"), "--seed", "3"]) == 0
    return d


def test_train_writes_a_small_versioned_artifact(workdir, capsys) -> None:
    art = load_artifact(workdir / "art")
    meta = art.metadata
    assert meta["version"].startswith("router-") and meta["train"]["seed"] == 3
    assert meta["data"][0]["path"] == "train.jsonl" and len(meta["data"][0]["sha256"]) == 64
    assert meta["embedder"]["name"].endswith("all-MiniLM-L6-v2") and meta["embedder"]["fingerprint"]
    assert "domain_accuracy" in meta["validation"] and "router" in meta["validation"]
    # the heads are small; the tuned encoder layers (float16) are most of it
    assert meta["embedder"]["tuned_layers"] == 6 and sum(k.startswith("tuned_") for k in art.arrays) == 72
    assert sum(f.stat().st_size for f in (workdir / "art").iterdir()) < 25_000_000


def test_training_is_deterministic_for_a_seed(workdir) -> None:
    assert main(["router", "train", "--data", str(workdir / "train.jsonl"), "--out", str(workdir / "again"), "--seed", "3"]) == 0
    a, b = load_artifact(workdir / "art"), load_artifact(workdir / "again")
    assert a.metadata == b.metadata
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_calibrate_by_rate_and_by_quality(workdir, capsys) -> None:
    assert main(["router", "calibrate", "--artifact", str(workdir / "art"), "--data", str(workdir / "train.jsonl"),
                 "--target-escalation-rate", "0.25"]) == 0
    meta = load_artifact(workdir / "art").metadata
    assert abs(meta["thresholds"]["escalation_rate_on_sample"] - 0.25) < 0.03
    assert main(["router", "calibrate", "--artifact", str(workdir / "art"), "--data", str(workdir / "train.jsonl"),
                 "--target-quality", "0.95"]) == 0
    assert "target_quality=0.95" in load_artifact(workdir / "art").metadata["thresholds"]["calibrated"]
    assert main(["router", "calibrate", "--artifact", str(workdir / "nope"), "--data", str(workdir / "train.jsonl"),
                 "--target-quality", "0.95"]) == 2
    assert "no such artifact folder" in capsys.readouterr().err


def test_score_keeps_order_and_reads_only_prompt(workdir) -> None:
    inp, out = workdir / "in.jsonl", workdir / "out.jsonl"
    prompts = ["Write a Python function that reverses a list.", "Mia has 4 pens and buys 3 more. How many pens?", "Can the tenant sue the landlord?"]
    inp.write_text("\n".join(json.dumps({"prompt": p, "other": 1}) for p in prompts) + "\n")
    assert main(["router", "score", "--artifact", str(workdir / "art"), "--input", str(inp), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"domain", "domain_probs", "escalation_score", "route"} for r in rows)
    assert [r["domain"] for r in rows] == ["code", "math", "legal"]
    assert all(abs(sum(r["domain_probs"].values()) - 1) < 1e-4 for r in rows)
    # The local profile has code and math specialists (min_domain_confidence 0.5), no legal one.
    for r in rows:
        confident = r["domain_probs"][r["domain"]] >= 0.5
        expected = r["domain"] if r["domain"] in ("code", "math") and confident else "general"
        assert r["route"]["model"] == expected
    assert rows[0]["route"] == {**rows[0]["route"], "model": "code", "reason": "domain:code"}
    assert rows[2]["route"]["reason"] == "general:no-specialist-for-legal"
    assert all(r["route"]["escalates"] == (r["escalation_score"] >= load_artifact(workdir / "art").escalation_threshold) for r in rows)


def test_score_reads_openai_messages_with_earlier_turns_as_context(workdir) -> None:
    inp, out = workdir / "msgs.jsonl", workdir / "msgs_out.jsonl"
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Write a Python function that reverses a list."},
             {"role": "assistant", "content": "def rev(xs): return xs[::-1]"}, {"role": "user", "content": [{"type": "text", "text": "and again (case 3)"}]}]
    inp.write_text(json.dumps({"messages": convo}) + "\n" + json.dumps({"messages": convo[3:]}) + "\n")
    assert main(["router", "score", "--artifact", str(workdir / "art"), "--input", str(inp), "--output", str(out)]) == 0
    with_context, alone = [json.loads(line) for line in out.read_text().splitlines()]
    router = TrainedRouter(workdir / "art")
    router.load()
    expected = router.score([RouteQuery("and again (case 3)", ("Write a Python function that reverses a list.",))])[0]
    assert with_context["domain_probs"] == pytest.approx(expected.domain_probs, abs=1e-6)
    assert with_context["domain_probs"] != pytest.approx(alone["domain_probs"], abs=1e-3)


@pytest.mark.parametrize("line, message", [
    ({"text": "no prompt"}, "needs a string 'prompt' or a 'messages' list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "'messages' is not a list of chat messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "no non-empty user message"),
])
def test_score_refuses_bad_lines_with_their_line_number(workdir, capsys, line, message) -> None:
    inp = workdir / "bad.jsonl"
    inp.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(line) + "\n")
    assert main(["router", "score", "--artifact", str(workdir / "art"), "--input", str(inp), "--output", str(workdir / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and message in err


def test_eval_reports_routellm_figures_and_baselines(workdir, capsys) -> None:
    other = workdir / "other.jsonl"
    write_data(other, seed=9)  # not the training file
    capsys.readouterr()
    assert main(["router", "eval", "--artifact", str(workdir / "art"), "--data", str(other), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 150 and "note" not in report
    assert report["domain_accuracy"] > 0.9 and report["gsm8k_math_share"] == 1.0
    for key in ("router", "random", "subject_prior"):
        assert {"apgr", "cpt50", "cpt80", "share_for_95", "cost_reduction_at_95"} <= set(report[key])
    assert main(["router", "eval", "--artifact", str(workdir / "art"), "--data", str(other)]) == 0
    assert "cost reduction @95%" in capsys.readouterr().out


def test_eval_on_a_training_file_measures_only_its_validation_split(workdir, capsys) -> None:
    meta = load_artifact(workdir / "art").metadata["train"]
    capsys.readouterr()
    assert main(["router", "eval", "--artifact", str(workdir / "art"), "--data", str(workdir / "train.jsonl"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"] == meta["validation_rows"] < 150
    assert "evaluating only its validation split" in captured.err
    assert main(["router", "eval", "--artifact", str(workdir / "art"), "--data", str(workdir / "train.jsonl"), "--all-rows", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"] == 150 and "WARNING" in captured.err


def test_eval_says_why_word_problems_have_no_cost_quality_figures(workdir, capsys) -> None:
    gsm = workdir / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"prompt": f"Tom has {i} pens and buys {i + 2} more. How many pens?", "domain": "math"}) + "\n"
                           for i in range(20)))
    capsys.readouterr()
    assert main(["router", "eval", "--artifact", str(workdir / "art"), "--data", str(gsm)]) == 0
    out = capsys.readouterr().out
    assert "GSM8K-style -> math" in out and "APGR, CPT, cost reduction: n/a (no weak_correct/strong_correct labels" in out


def test_served_scores_carry_the_threshold(workdir) -> None:
    router = TrainedRouter(workdir / "art")
    router.load()
    [s] = router.score(["Write a Python function that reverses a list."])
    assert s.domain == "code" and 0 < s.escalation_score < 1
    assert s.escalation_threshold == load_artifact(workdir / "art").escalation_threshold
    assert TrainedRouter(workdir / "art", threshold=0.7).threshold_override == 0.7


CHAT = {"code": ["how do I fix a {} error in my react app", "write a bash script that {}", "my python loop {} forever, why?"],
        "general": ["write a friendly email about {}", "give me ideas for a birthday party where {}", "summarise this story: {}"]}


def write_chat(path, n_per: int = 40, seed: int = 5) -> None:
    rng = random.Random(seed)
    lines = [{"id": f"{d}{i}", "prompt": rng.choice(t).format(rng.choice(FILLERS)) + f" #{i}", "domain": d, "subject": f"chat:{d}",
              "sample": "round2"} for d, t in CHAT.items() for i in range(n_per)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_training_with_chat_rows_sets_a_chat_threshold_and_reports_chat(workdir, capsys) -> None:
    write_chat(workdir / "chat.jsonl")
    out = workdir / "chat_art"
    assert main(["router", "train", "--data", str(workdir / "train.jsonl"), str(workdir / "chat.jsonl"), "--out", str(out),
                 "--seed", "3", "--tune-layers", "1", "--tune-epochs", "1"]) == 0
    art = load_artifact(out)
    thresholds = art.metadata["thresholds"]
    assert thresholds["calibrated"].startswith("target_escalation_rate=0.2 on the chat training prompts")
    assert "exam_quality_threshold" in thresholds and art.metadata["embedder"]["tuned_layers"] == 1
    assert {"chat:code", "chat:general"} <= set(art.subjects)
    write_chat(workdir / "chat_new.jsonl", n_per=30, seed=11)  # not trained on
    capsys.readouterr()
    assert main(["router", "eval", "--artifact", str(out), "--data", str(workdir / "chat_new.jsonl"), "--json"]) == 0
    chat = json.loads(capsys.readouterr().out)["chat"]
    assert chat["rows"] == 60 and chat["domain_accuracy"] > 0.8
    assert set(chat["per_domain"]) == set(DOMAINS) and chat["per_domain"]["code"]["support"] == 30
    esc = chat["escalation"]
    assert esc["threshold"] == thresholds["escalation"] and 0 <= esc["share_escalated"] <= 1
    assert esc["exam_threshold"] == thresholds["exam_quality_threshold"]
    # per predicted domain: each domain with enough training prompts has its own bar, and
    # eval applies them, as the serving router does
    assert set(thresholds["by_domain"]) == {"code", "general"}
    assert set(esc["share_escalated_by_domain"]) <= set(DOMAINS)


def test_calibrate_per_domain_and_serving_uses_each_domains_bar(workdir, tmp_path, capsys) -> None:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(workdir / "art", art)
    assert main(["router", "calibrate", "--artifact", str(art), "--data", str(workdir / "train.jsonl"),
                 "--target-escalation-rate", "0.3", "--per-domain"]) == 0
    thresholds = load_artifact(art).metadata["thresholds"]
    by = thresholds["by_domain"]
    assert set(by) == {"code", "legal", "medical", "general", "math"}  # 30 prompts each, all over the minimum of 20
    assert json.loads(capsys.readouterr().out)["by_domain"] == by
    router = TrainedRouter(art)
    router.load()
    prompts = [json.loads(line)["prompt"] for line in (workdir / "train.jsonl").read_text().splitlines()]
    scores = router.score(prompts)
    for domain in by:
        mine = [s for s in scores if s.domain == domain]
        assert mine and all(s.escalation_threshold == by[domain] for s in mine)
        # each domain escalates about the target share of its own prompts
        assert abs(sum(s.escalation_score >= by[domain] for s in mine) / len(mine) - 0.3) < 0.1
    # the override still wins
    overridden = TrainedRouter(art, threshold=0.9)
    overridden.load()
    assert {s.escalation_threshold for s in overridden.score(prompts[:5])} == {0.9}
    # --per-domain needs a rate
    assert main(["router", "calibrate", "--artifact", str(art), "--data", str(workdir / "train.jsonl"),
                 "--target-quality", "0.9", "--per-domain"]) == 2
