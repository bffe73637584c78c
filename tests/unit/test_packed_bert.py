"""The packed (padding-free) MiniLM forward pass against transformers' own BertModel."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from router_models.embedder import Embedder, embedder_dir  # noqa: E402
from router_models.packed_bert import PackedBert  # noqa: E402

PROMPTS = [
    "What is 7 times 8?",
    "Write a Python function that reverses a linked list in place and explain its complexity.",
    "A landowner sued a neighbor for trespass after the neighbor built a fence on the disputed strip of land "
    "between their properties. The neighbor claims adverse possession. " * 9,  # long: truncated at 256 tokens
    "ok",
    "Which of the following best describes the mechanism of action of beta blockers? A. ... B. ... C. ... D. ...",
]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' recipe on transformers.AutoModel in float32: mean pool, L2 norm."""
    folder = str(embedder_dir())
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    enc = tok(PROMPTS, truncation=True, max_length=256, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


def test_float32_matches_transformers(reference: np.ndarray) -> None:
    got = Embedder(dtype="float32").embed(PROMPTS)
    assert np.abs(got - reference).max() < 1e-5


def test_bfloat16_stays_close_to_float32(reference: np.ndarray) -> None:
    got = Embedder(dtype="bfloat16").embed(PROMPTS)
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert (got * reference).sum(1).min() > 0.999


def test_a_prompt_gets_the_same_embedding_alone_or_in_a_mixed_length_batch() -> None:
    embedder = Embedder(dtype="bfloat16")
    together = embedder.embed(PROMPTS)
    alone = np.concatenate([embedder.embed([p]) for p in PROMPTS])
    assert np.abs(together - alone).max() < 5e-3
    assert (together * alone).sum(1).min() > 0.9999


def test_tokens_match_the_transformers_tokenizer_and_truncate() -> None:
    embedder = Embedder(max_tokens=256)
    tok = transformers.AutoTokenizer.from_pretrained(str(embedder_dir()), local_files_only=True)
    ids = embedder.token_ids(PROMPTS)
    assert ids == tok(PROMPTS, truncation=True, max_length=256)["input_ids"]
    assert len(ids[2]) == 256 and ids[2][0] == tok.cls_token_id and ids[2][-1] == tok.sep_token_id


def test_sequences_outside_the_position_table_are_refused() -> None:
    model = PackedBert(embedder_dir(), dtype=torch.float32)
    with pytest.raises(ValueError, match="1..512 tokens"):
        model.embed([[101, 102], []])
    with pytest.raises(ValueError, match="1..512 tokens"):
        model.embed([[101] * 513])
    assert model.embed([]).shape == (0, 384)
