"""The PII screen: find personal data and secrets in request text, and redact them.

Pure and offline. Each detector is a pattern plus the check that real validators use, so
that digits that merely look like a number are not flagged:
- email addresses;
- phone numbers: Google's libphonenumber (the ``phonenumbers`` package, what Presidio's
  PhoneRecognizer uses) with VALID leniency, numbers without a country code read as US;
- payment card numbers: 13-19 digits (spaces or dashes allowed) starting 2-6, Luhn-checked;
- IBANs: country code, check digits and 11-30 characters, mod-97-checked (ISO 13616);
- US SSNs: ``AAA-GG-SSSS`` (dash or space) with the SSA's rules (area not 000, 666 or 9xx,
  group not 00, serial not 0000);
- IP addresses, v4 and v6, validated by ``ipaddress``;
- secrets: API keys with known prefixes (OpenAI, Anthropic, AWS, GitHub, Slack, Google,
  Stripe, GitLab, Hugging Face) and PEM private key blocks.

Why not Presidio itself: its analyzer imports spaCy (a 390 MB environment here), and its
email recognizer asks ``tldextract`` to fetch the public suffix list from the internet on
first use (measured on this offline machine: a ConnectionError, then a fallback). The
pattern-and-checksum approach below is the same as its pattern recognizers', with no NLP
model, and it adds secret detection, which Presidio lacks. See docs/ensemble.md.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

PII_TYPES: tuple[str, ...] = ("SECRET", "CREDIT_CARD", "IBAN", "US_SSN", "EMAIL", "IP_ADDRESS", "PHONE")


@dataclass(frozen=True)
class Span:
    kind: str
    start: int
    end: int


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
_IPV4 = re.compile(r"(?<!\d)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\d)(?!\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_SECRETS = re.compile(
    "|".join(
        [
            r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
            r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",  # GitHub tokens
            r"\bgithub_pat_[A-Za-z0-9_]{22,}",
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
            r"\bAIza[0-9A-Za-z_-]{35}",  # Google API keys
            r"\b[sr]k_live_[0-9A-Za-z]{20,}",  # Stripe
            r"\bglpat-[A-Za-z0-9_-]{20,}",  # GitLab
            r"\bhf_[A-Za-z0-9]{30,}",  # Hugging Face
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.|\n)*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
        ]
    )
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=1)
def _phonenumbers():  # imported on first use: it loads per-region metadata
    import phonenumbers

    return phonenumbers


# Digit runs that could hold a phone number. libphonenumber's matcher is thorough but slow
# over a whole long prompt (57 ms for a 21,000-character one full of timestamps), so it
# reads only these runs, each with 8 characters of context on either side: 13 ms for that
# prompt, and the same matches as the whole-text matcher on 2,000 chat prompts (its
# time-of-day and context checks need those 8 characters; 2 were not enough).
_PHONE_CANDIDATE = re.compile(r"\+?\(?\d[\d \t().\-/]{5,24}\d")


def _phones(text: str) -> list[Span]:
    pn = _phonenumbers()
    spans = []
    for cand in _PHONE_CANDIDATE.finditer(text):
        if sum(ch.isdigit() for ch in cand.group()) < 7:
            continue
        start, end = max(0, cand.start() - 8), min(len(text), cand.end() + 8)
        for m in pn.PhoneNumberMatcher(text[start:end], "US", leniency=pn.Leniency.VALID):
            spans.append(Span("PHONE", start + m.start, start + m.end))
    return spans


def find(text: str) -> list[Span]:
    """Every PII span, non-overlapping, in text order. Where two detectors claim the same
    characters, the one earlier in ``PII_TYPES`` wins (a card number is not also a phone)."""
    found: list[Span] = [Span("SECRET", m.start(), m.end()) for m in _SECRETS.finditer(text)]
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            found.append(Span("CREDIT_CARD", m.start(), m.end()))
    found += [Span("IBAN", m.start(), m.end()) for m in _IBAN.finditer(text) if iban_ok(m.group())]
    found += [Span("US_SSN", m.start(), m.end()) for m in _SSN.finditer(text) if _ssn_ok(m.group(1), m.group(3), m.group(4))]
    found += [Span("EMAIL", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    for pattern in (_IPV4, _IPV6):
        found += [Span("IP_ADDRESS", m.start(), m.end()) for m in pattern.finditer(text) if _ip_ok(m.group())]
    if any(ch.isdigit() for ch in text):
        found += _phones(text)
    rank = {kind: i for i, kind in enumerate(PII_TYPES)}
    kept: list[Span] = []
    for span in sorted(found, key=lambda s: (rank[s.kind], s.start)):
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


def kinds(spans: list[Span]) -> tuple[str, ...]:
    """The distinct types found, in ``PII_TYPES`` order (for the x-slm-pii header)."""
    present = {s.kind for s in spans}
    return tuple(k for k in PII_TYPES if k in present)


def redact(text: str, spans: list[Span] | None = None) -> str:
    """``text`` with each span replaced by a typed placeholder such as ``[EMAIL]``."""
    spans = find(text) if spans is None else spans
    out, last = [], 0
    for span in spans:
        out.append(text[last : span.start])
        out.append(f"[{span.kind}]")
        last = span.end
    out.append(text[last:])
    return "".join(out)
