"""The OpenAI endpoints beside chat: /v1/models, /v1/embeddings and /v1/completions.

Request schemas (validated strictly at the edge, like chat) and the pure shaping of the
response bodies; the gateway (``deployments/gateway/endpoints.py``) does the I/O. What each
endpoint accepts and refuses is documented in docs/endpoints.md.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.config import ClusterConfig, GatewayConfig, SamplingDefaults
from cluster.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from cluster.openai_schema import StreamOptions, usage_body, validation_message
from cluster.routing import AUTO
from cluster.types import GenerationRequest, RouteDecision, SamplingParams, TokenLogprob

# --- /v1/models ------------------------------------------------------------------------

EMBEDDER_ID = "router-embedder"
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's sentence embedding
EMBEDDER_DESCRIPTION = "all-MiniLM-L6-v2 sentence embeddings (384 dimensions, unit norm), from the router's deployment."
UNSUPPORTED = "unsupported_parameter"


def embeddings_available(cfg: ClusterConfig) -> bool:
    """Only the trained router loads a sentence embedder; the heuristic one has none."""
    return cfg.router.kind == "trained"


def model_objects(cfg: ClusterConfig, created: int) -> list[dict[str, Any]]:
    """Every id the gateway answers to, in OpenAI's model object shape with our extra
    fields: ``auto``, each model (``versions``, ``current_version``), each ``model@version``
    (``parent``, ``engine``), and ``router-embedder`` when the router has an embedder."""
    def obj(id_: str, owner: str, **extra: Any) -> dict[str, Any]:
        return {"id": id_, "object": "model", "created": created, "owned_by": owner, **extra}

    out = [obj(AUTO, "slm-cluster", description="Routed: the router picks the specialist for the request's domain, "
                                                "else the general model (and escalates to the frontier when it needs to).",
               role="router", domains=[], endpoints=["chat.completions", "completions"])]
    for m in cfg.models:
        raw = [v.name for v in m.versions if v.engine.kind in RAW_PROMPT_KINDS]
        common = {"description": m.description, "role": m.role, "domains": list(m.domains)}
        endpoints = ["chat.completions", "completions"] if m.current.engine.kind in RAW_PROMPT_KINDS else ["chat.completions"]
        out.append(obj(m.name, m.owned_by, **common, versions=[v.name for v in m.versions], current_version=m.current.name,
                       endpoints=endpoints))
        for v in m.versions:
            endpoints = ["chat.completions", "completions"] if v.name in raw else ["chat.completions"]
            out.append(obj(f"{m.name}@{v.name}", m.owned_by, **common, parent=m.name, version=v.name, engine=v.engine.kind,
                           endpoints=endpoints))
    if embeddings_available(cfg):
        out.append(obj(EMBEDDER_ID, "slm-cluster", description=EMBEDDER_DESCRIPTION, role="embedding", domains=[],
                       dimensions=EMBEDDING_DIM, endpoints=["embeddings"]))
    return out


def models_list(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": objects}


def find_model(objects: list[dict[str, Any]], model_id: str) -> dict[str, Any]:
    """The object /v1/models lists under ``model_id``; ``ModelNotFoundError`` (404) else."""
    for o in objects:
        if o["id"] == model_id:
            return o
    raise ModelNotFoundError(f"The model {model_id!r} does not exist. Try GET /v1/models.", param="model")


# --- shared parsing ----------------------------------------------------------------------


def _parse(body: bytes, schema: type[BaseModel]) -> Any:
    """The body validated against ``schema``; a 400 in OpenAI's wording otherwise (the
    same rules as ``openai_schema.parse_chat_request``)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(data)
    except (ValidationError, RecursionError) as err:
        message, param = validation_message(err) if isinstance(err, ValidationError) else ("The request is nested too deeply.", None)
        raise InvalidRequestError(message, param=param) from None


def _unsupported(param: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"The parameter {param!r} is not supported here: {why}", param=param, code=UNSUPPORTED)


# --- /v1/embeddings ----------------------------------------------------------------------

EMBED_MAX_ITEMS = 256  # inputs per request; each is one row of the embedder's batch
EMBED_MAX_CHARS = 16_000  # per input; the embedder reads its first 256 tokens anyway


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    # Token arrays are OpenAI's too; they are refused below (the ids are another tokenizer's).
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


@dataclasses.dataclass(frozen=True)
class EmbeddingJob:
    texts: tuple[str, ...]
    encoding_format: str


def parse_embedding_request(body: bytes, cfg: ClusterConfig) -> EmbeddingJob:
    """The texts to embed, or the 400/404 that names what is wrong."""
    req: EmbeddingRequest = _parse(body, EmbeddingRequest)
    if req.model != EMBEDDER_ID:
        raise ModelNotFoundError(f"The model {req.model!r} does not serve embeddings; use {EMBEDDER_ID!r}.", param="model")
    if not embeddings_available(cfg):
        raise ModelNotFoundError(f"{EMBEDDER_ID!r} is not available: embeddings need router.kind: trained "
                                 f"(this cluster runs the {cfg.router.kind} router, which has no embedder).", param="model")
    if req.dimensions is not None and req.dimensions != EMBEDDING_DIM:
        raise _unsupported("dimensions", f"{EMBEDDER_ID} embeds in {EMBEDDING_DIM} dimensions only.")
    items: list[Any] = [req.input] if isinstance(req.input, str) else list(req.input)
    if not items:
        raise InvalidRequestError("input must not be empty.", param="input")
    if any(not isinstance(x, str) for x in items):
        raise _unsupported("input", "token arrays are not accepted; send strings.")
    if len(items) > EMBED_MAX_ITEMS:
        raise InvalidRequestError(f"At most {EMBED_MAX_ITEMS} inputs per request, got {len(items)}.", param="input")
    for i, text in enumerate(items):
        if not text:
            raise InvalidRequestError(f"input[{i}] is empty.", param="input")
        if len(text) > EMBED_MAX_CHARS:
            raise InvalidRequestError(f"input[{i}] is {len(text)} characters; at most {EMBED_MAX_CHARS}.", param="input")
    return EmbeddingJob(tuple(items), req.encoding_format)


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: little-endian float32 bytes, which the OpenAI SDKs decode."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return [float(x) for x in vector]


def embedding_body(vectors: Sequence[Sequence[float]], prompt_tokens: int, encoding_format: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)} for i, v in enumerate(vectors)],
        "model": EMBEDDER_ID,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


# --- /v1/completions ---------------------------------------------------------------------

# Engine kinds whose adapter takes a raw prompt (``EngineCapabilities.raw_prompt``; a unit
# test holds the two equal).
RAW_PROMPT_KINDS = frozenset({"hf", "fake", "remote_openai", "vllm", "sglang"})


class CompletionRequest(BaseModel):
    """OpenAI's legacy text completion request; parameters we cannot honour are refused
    in ``to_completion_request`` rather than ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=20)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


def parse_completion_request(body: bytes) -> CompletionRequest:
    return _parse(body, CompletionRequest)


def to_completion_request(req: CompletionRequest, gw: GatewayConfig, request_id: str) -> GenerationRequest:
    """The gateway's limits and our refusals (400s naming the parameter), then the raw-prompt
    generation request. Fields the client left out are in ``unset_sampling``."""
    refusals = [
        ("echo", req.echo, "the prompt is not echoed back."),
        ("suffix", req.suffix is not None, "insertion (suffix) is not supported."),
        ("n", req.n > 1, "one choice per request."),
        ("best_of", req.best_of not in (None, 1), "one choice per request."),
        ("logprobs", bool(req.logprobs), "only logprobs: 0 (the chosen tokens' logprobs, no alternatives)."),
        ("presence_penalty", req.presence_penalty != 0, "penalties are not supported on /v1/completions."),
        ("frequency_penalty", req.frequency_penalty != 0, "penalties are not supported on /v1/completions."),
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported on /v1/completions."),
    ]
    for param, refused, why in refusals:
        if refused:
            raise _unsupported(param, why)
    prompt = prompt_text(req.prompt)
    if len(prompt) > gw.max_prompt_chars:
        raise ContextLengthExceededError(f"The prompt is {len(prompt)} characters; this server allows at most {gw.max_prompt_chars}.",
                                         param="prompt")
    if not prompt.strip():
        raise InvalidRequestError("prompt must not be empty.", param="prompt")
    max_tokens = req.max_tokens if req.max_tokens is not None else gw.default_max_tokens
    if max_tokens > gw.max_tokens_cap:
        raise InvalidRequestError(f"max_tokens is {max_tokens}; this server allows at most {gw.max_tokens_cap}.", param="max_tokens")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stops) > 4:
        raise InvalidRequestError("Invalid value for stop: at most 4 stop sequences", param="stop")
    unset = frozenset(name for name in ("temperature", "top_p") if getattr(req, name) is None)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else 1.0,  # OpenAI's default
        top_p=req.top_p if req.top_p is not None else 1.0,
        stop=stops,
        seed=req.seed,
        logprobs=req.logprobs is not None,
    )
    return GenerationRequest(request_id=request_id, messages=(), sampling=sampling, prompt=prompt, unset_sampling=unset)


def prompt_text(prompt: str | list[str] | list[int] | list[list[int]]) -> str:
    """One string prompt: a string, or a list holding one string; token prompts and
    batches of several prompts are refused."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if any(not isinstance(p, str) for p in prompt):
        raise _unsupported("prompt", "token arrays are not accepted; send a string.")
    raise _unsupported("prompt", "one prompt per request (a string, or a list of one string).")


def _kind(cfg: ClusterConfig, decision: RouteDecision) -> str:
    model = cfg.model(decision.model)
    version = model.version(decision.version) if model is not None else None
    return version.engine.kind if version is not None else "unknown"


def raw_prompt_decision(cfg: ClusterConfig, decision: RouteDecision, *, auto: bool) -> RouteDecision:
    """The decision when its engine takes raw prompts. An ``auto`` pick whose engine does
    not falls back to the general model (reason ``general:raw-prompt``) when that one does;
    otherwise a 400 naming ``model``."""
    if _kind(cfg, decision) in RAW_PROMPT_KINDS:
        return decision
    general = cfg.general
    fallback = RouteDecision(model=general.name, version=general.current.name, reason="general:raw-prompt", domain=decision.domain)
    if auto and _kind(cfg, fallback) in RAW_PROMPT_KINDS:
        return fallback
    check_raw_prompt(cfg, decision)
    return decision  # unreachable: check_raw_prompt raised


def check_raw_prompt(cfg: ClusterConfig, decision: RouteDecision) -> None:
    """A 400 naming ``model`` when the version's engine cannot take a raw prompt."""
    kind = _kind(cfg, decision)
    if kind not in RAW_PROMPT_KINDS:
        raise InvalidRequestError(
            f"The model {decision.served_name!r} ({kind} engine) does not serve /v1/completions (raw prompts); "
            "use /v1/chat/completions, or a model whose /v1/models entry lists the completions endpoint.",
            param="model", code="model_not_supported")


def legacy_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The completions API's logprobs object; ``top_logprobs`` is null (no alternatives)."""
    offsets, at = [], 0
    for item in items:
        offsets.append(at)
        at += len(item.token)
    return {"tokens": [i.token for i in items], "token_logprobs": [i.logprob for i in items], "top_logprobs": None,
            "text_offset": offsets}


def text_completion_body(*, completion_id: str, created: int, model: str, text: str, finish_reason: str,
                         prompt_tokens: int, completion_tokens: int, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": legacy_logprobs(logprobs) if logprobs is not None else None,
                     "finish_reason": finish_reason}],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }


def text_completion_chunk(*, completion_id: str, created: int, model: str, text: str = "", finish_reason: str | None = None,
                          logprobs: Sequence[TokenLogprob] | None = None, usage: dict[str, int] | None = None,
                          with_choice: bool = True) -> dict[str, Any]:
    """One streamed event: the legacy shape is the whole body with the text so far's delta."""
    body: dict[str, Any] = {"id": completion_id, "object": "text_completion", "created": created, "model": model, "choices": []}
    if with_choice:
        body["choices"] = [{"text": text, "index": 0, "logprobs": legacy_logprobs(logprobs) if logprobs is not None else None,
                            "finish_reason": finish_reason}]
    if usage is not None:
        body["usage"] = usage
    return body


# --- per-version sampling defaults -------------------------------------------------------


def apply_defaults(request: GenerationRequest, defaults: SamplingDefaults) -> GenerationRequest:
    """The request with the version's defaults in the sampling fields the client left out
    (``unset_sampling``); a field the client set is never changed."""
    changes = {name: getattr(defaults, name) for name in ("temperature", "top_p")
               if name in request.unset_sampling and getattr(defaults, name) is not None}
    if not changes:
        return request
    return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, **changes))
