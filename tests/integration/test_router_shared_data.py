"""CI trains a small router from the shared data, to prove the pipeline runs end to end:
train -> eval -> calibrate -> score, on the real files in ../shared/data/router."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from cluster.cli.main import main

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "router"
pytestmark = pytest.mark.skipif(not (SHARED / "mmlu_train.jsonl").is_file(), reason=f"no shared data at {SHARED}")


def head(src: Path, dst: Path, n: int, start: int = 0) -> Path:
    with src.open() as f:
        dst.write_text("".join(islice(f, start, start + n)))
    return dst


# Training embeds and tunes on CPU: about 2 minutes on 2 cores, more on a busy CI host.
@pytest.mark.timeout(600)
def test_small_router_from_the_shared_data(tmp_path, capsys) -> None:
    mmlu, gsm = SHARED / "mmlu_train.jsonl", SHARED / "gsm8k_train.jsonl"
    art = tmp_path / "art"
    assert main(["router", "train", "--data", str(mmlu), str(gsm), "--out", str(art), "--max-rows", "900", "--seed", "1",
                 "--tune-layers", "1"]) == 0  # tuning one layer proves the tuning path; six cost 2x the time
    meta = json.loads((art / "metadata.json").read_text())
    assert meta["train"]["rows"] + meta["train"]["validation_rows"] == 900
    assert {d["path"] for d in meta["data"]} == {"mmlu_train.jsonl", "gsm8k_train.jsonl"}
    assert meta["embedder"]["tuned_layers"] == 1 and meta["embedder"]["compute"] in ("bfloat16", "float32")

    sample = head(mmlu, tmp_path / "sample.jsonl", 300, start=4000)
    capsys.readouterr()
    assert main(["router", "eval", "--artifact", str(art), "--data", str(sample), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["domain_accuracy"] > 0.6  # a 900-row model; the shipped one is far better
    assert report["router"]["apgr"] is not None and report["random"]["apgr"] is not None

    assert main(["router", "calibrate", "--artifact", str(art), "--data", str(sample), "--target-escalation-rate", "0.3"]) == 0
    word_problems = head(gsm, tmp_path / "gsm.jsonl", 40, start=3000)
    out = tmp_path / "scores.jsonl"
    assert main(["router", "score", "--artifact", str(art), "--input", str(word_problems), "--output", str(out)]) == 0
    domains = [json.loads(line)["domain"] for line in out.read_text().splitlines()]
    assert len(domains) == 40 and domains.count("math") >= 36
