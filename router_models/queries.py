"""Read what ``slmctl router score`` scores: JSON lines holding a ``prompt`` or OpenAI ``messages``."""

from __future__ import annotations

from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from cluster.chat import route_query_of
from cluster.errors import InvalidRequestError
from cluster.openai_schema import WireMessage
from cluster.types import ChatMessage, RouteQuery
from router_models.data import json_lines

INPUT_HELP = (
    'one JSON object a line, either {"prompt": "..."} (a one-turn request) or an OpenAI chat request\'s '
    '{"messages": [{"role": "user", "content": "..."}, ...]} (the router reads the last user turn, with the '
    "earlier user turns as context, as the gateway does); other keys are ignored"
)
_MESSAGES = TypeAdapter(list[WireMessage])


def query_of(obj: object, where: str) -> RouteQuery:
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{where}: each line must be a JSON object")
    if isinstance(obj.get("prompt"), str):
        return RouteQuery(obj["prompt"])
    if "messages" in obj:
        try:
            wire = _MESSAGES.validate_python(obj["messages"])
        except ValidationError as err:
            raise InvalidRequestError(f"{where}: 'messages' is not a list of chat messages ({err.errors()[0]['msg']})") from None
        query = route_query_of([ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in wire])
        if not query.request.strip():
            raise InvalidRequestError(f"{where}: 'messages' holds no non-empty user message")
        return query
    raise InvalidRequestError(f"{where}: a line needs a string 'prompt' or a 'messages' list")


def read_queries(path: str | Path) -> list[RouteQuery]:
    return [query_of(obj, where) for where, obj in json_lines(path)]
