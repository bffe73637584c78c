"""Pure data-policy decisions: a request's data class, and where it may go.

Every model version is ``on_prem`` or ``external`` (``ModelVersionConfig.where``). A
request's class comes from the ``x-slm-data-class`` header, else the config's default;
the PII screen raises it to ``restricted`` under ``pii: detect``. Only the classes in
``policy.external_allowed`` may reach an external model, whatever the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster import pii
from cluster.config import DATA_CLASSES, ClusterConfig, PolicyConfig
from cluster.errors import PIIDetectedError, PolicyViolationError
from cluster.headers import parse_choice
from cluster.types import ChatMessage

DATA_CLASS_HEADER = "x-slm-data-class"


@dataclass(frozen=True)
class Screened:
    """The outcome of the PII screen and the class rules for one request."""

    data_class: str
    pii_types: tuple[str, ...] = ()
    # Messages for external models: the originals, or with PII redacted under ``redact``.
    external_messages: tuple[ChatMessage, ...] | None = None


def parse_data_class(header: str | None, policy: PolicyConfig) -> str:
    return parse_choice(header, default=policy.default_data_class, allowed=DATA_CLASSES, name=DATA_CLASS_HEADER, what="data class")


def screen(messages: tuple[ChatMessage, ...], declared_class: str, policy: PolicyConfig) -> Screened:
    """Run the PII screen over every message and apply ``policy.pii``.

    detect: PII raises the class to restricted (it stays on-prem). redact: the class is
    kept and external models get the messages with typed placeholders. block: refused.
    """
    if policy.pii == "off":
        return Screened(declared_class, (), messages)
    spans = [pii.find(m.content) for m in messages]
    found = pii.kinds([s for per in spans for s in per])
    if not found:
        return Screened(declared_class, (), messages)
    if policy.pii == "block":
        raise PIIDetectedError(f"The request contains personal data or secrets ({', '.join(found)}); this server refuses it.")
    if policy.pii == "detect":
        return Screened("restricted", found, None)
    redacted = tuple(ChatMessage(m.role, pii.redact(m.content, s)) if s else m for m, s in zip(messages, spans))
    return Screened(declared_class, found, redacted)


def may_leave(data_class: str, policy: PolicyConfig) -> bool:
    return data_class in policy.external_allowed


def is_external(cfg: ClusterConfig, model: str, version: str) -> bool:
    found = cfg.model(model)
    v = found.version(version) if found is not None else None
    return v is not None and v.where == "external"


def allowed(cfg: ClusterConfig, screened: Screened, model: str, version: str) -> bool:
    """Whether this request may be served by that model version."""
    if not is_external(cfg, model, version):
        return True
    return may_leave(screened.data_class, cfg.policy) and screened.external_messages is not None


def check_named(cfg: ClusterConfig, screened: Screened, model: str, version: str) -> None:
    """A request that names an external model its data may not reach gets a 403."""
    if not allowed(cfg, screened, model, version):
        why = f" (personal data found: {', '.join(screened.pii_types)})" if screened.pii_types else ""
        raise PolicyViolationError(
            f"Requests of data class {screened.data_class!r}{why} may not be sent to the external model {model}@{version}; "
            f"allowed classes: {', '.join(cfg.policy.external_allowed) or 'none'}.",
            param="model",
        )
