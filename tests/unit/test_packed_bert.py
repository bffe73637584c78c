"""The packed (padding-free) MiniLM forward pass against transformers' own BertModel."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from router_models.embedder import COMPUTE_ENV, Embedder, embedder_dir, pick_compute  # noqa: E402
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


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_bfloat16_stays_close_to_float32(reference: np.ndarray, compute: str) -> None:
    got = Embedder(dtype="bfloat16", compute=compute).embed(PROMPTS)
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert (got * reference).sum(1).min() > 0.999


def test_bf16_weights_multiplied_in_float32_serve_what_bf16_compute_serves() -> None:
    """A CPU without bf16 instructions multiplies the bf16-rounded weights in float32: the
    embeddings stay within bf16's own batch-shape noise of bf16 compute, under the same
    fingerprint, and the shipped router's heads decide the same on them."""
    from router_models.artifact import DEFAULT_ARTIFACT, TUNED_PREFIX, load_artifact
    from router_models.heads import predict

    artifact = load_artifact(DEFAULT_ARTIFACT)
    native, wide = Embedder(dtype="bfloat16", compute="bfloat16"), Embedder(dtype="bfloat16", compute="float32")
    assert native.fingerprint == wide.fingerprint
    for e in (native, wide):
        e.use_tuned_layers(artifact.arrays, TUNED_PREFIX)
    a, b = native.embed(PROMPTS), wide.embed(PROMPTS)
    assert (native.compute, wide.compute) == ("bfloat16", "float32")
    assert (a * b).sum(1).min() > 0.9998
    pa, pb = predict(artifact.arrays, a, PROMPTS), predict(artifact.arrays, b, PROMPTS)
    assert (pa.domain_probs.argmax(1) == pb.domain_probs.argmax(1)).all()
    assert np.abs(pa.escalation - pb.escalation).max() < 0.03


@pytest.mark.parametrize(("dtype", "requested", "native", "expected"), [
    ("bfloat16", "auto", True, "bfloat16"),
    ("bfloat16", "auto", False, "float32"),  # emulated bf16 is ~5x slower than float32
    ("bfloat16", "bfloat16", False, "bfloat16"),  # pinned by the operator
    ("bfloat16", "float32", True, "float32"),
    ("float32", "bfloat16", True, "float32"),  # float32 weights are never rounded
])
def test_pick_compute(dtype, requested, native, expected) -> None:
    assert pick_compute(dtype, requested, native) == expected


def test_compute_is_checked_and_the_environment_overrides_auto(monkeypatch) -> None:
    with pytest.raises(ValueError, match="compute must be one of"):
        Embedder(compute="int8")
    monkeypatch.setenv(COMPUTE_ENV, "bfloat16")
    assert Embedder().requested_compute == "bfloat16"
    assert Embedder(compute="float32").requested_compute == "float32"  # an explicit choice wins
    monkeypatch.setenv(COMPUTE_ENV, "fp8")
    with pytest.raises(ValueError, match="compute must be one of"):
        Embedder()


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_a_prompt_gets_the_same_embedding_alone_or_in_a_mixed_length_batch(compute: str) -> None:
    embedder = Embedder(dtype="bfloat16", compute=compute)
    together = embedder.embed(PROMPTS)
    alone = np.concatenate([embedder.embed([p]) for p in PROMPTS])
    assert np.abs(together - alone).max() < 5e-3
    # bfloat16 kernels round differently with the batch's shape, more on some CPUs than
    # others (0.99986 on an AMD EPYC host): the bar is bf16 rounding noise, five times
    # tighter than the bf16-against-float32 bar above.
    assert (together * alone).sum(1).min() > 0.9998


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


@pytest.mark.parametrize(("request_ids", "context", "head", "ctx_max", "expected"), [
    (list(range(10, 14)), [], None, 0, [1, 10, 11, 12, 13, 2]),  # fits
    (list(range(10, 20)), [], None, 0, [1, 10, 11, 12, 13, 14, 15, 2]),  # start only, as plain truncation
    (list(range(10, 20)), [], 2, 0, [1, 10, 11, 16, 17, 18, 19, 2]),  # head 2, the rest from the end
    (list(range(10, 20)), [], 0, 0, [1, 14, 15, 16, 17, 18, 19, 2]),  # end only
    (list(range(10, 13)), [90, 91, 92, 93], None, 1, [1, 10, 11, 12, 2, 90, 2]),  # context capped at ctx_max
    (list(range(10, 13)), [90, 91, 92, 93], None, 64, [1, 10, 11, 12, 2, 90, 91, 2]),  # context fills what the request leaves
    (list(range(10, 20)), [90], None, 64, [1, 10, 11, 12, 13, 14, 15, 2]),  # a long request leaves no room for context
])
def test_window_keeps_the_request_first(request_ids, context, head, ctx_max, expected) -> None:
    from router_models.embedder import window_ids

    assert window_ids(request_ids, context, 1, 2, 8, head, ctx_max) == expected


def test_head_only_window_matches_plain_truncation() -> None:
    """Artifacts trained before windows existed keep exactly their token ids."""
    e = Embedder().load()
    long = PROMPTS[2]
    plain = e._tokenizer.encode(long).ids  # no truncation: cut by hand as the old tokenizer did
    assert e.token_ids([long])[0] == plain[:255] + [plain[-1]]
