"""The PII screen: a table of positive and negative cases, and redaction."""

from __future__ import annotations

import pytest

from cluster import pii

# (text, the PII types expected in it, in PII_TYPES order)
CASES: list[tuple[str, tuple[str, ...]]] = [
    # email
    ("write to jane.roe@example.org today", ("EMAIL",)),
    ("JOHN_DOE+tag@mail.co.uk", ("EMAIL",)),
    ("the @decorator syntax in python", ()),
    ("user@localhost is not routable", ()),
    ("git clone git@github", ()),
    # phone numbers (libphonenumber, VALID leniency)
    ("call (415) 555-2671 tonight", ("PHONE",)),
    ("call +44 20 7946 0958 in London", ("PHONE",)),
    ("my number is 650-253-0000", ("PHONE",)),
    ("+49 30 901820 is Berlin's", ("PHONE",)),
    ("the answer is 42", ()),
    ("in 2023-10-12 we shipped v3.11", ()),
    ("compute 123 * 456 + 789", ()),
    ('time="2023-01-13 11:40:59" level=error', ()),  # a timestamp, not a phone
    ('"localtime": "2022-12-12 22:07"', ()),
    # payment cards (Luhn)
    ("card 4111 1111 1111 1111 exp 12/29", ("CREDIT_CARD",)),
    ("5500-0000-0000-0004", ("CREDIT_CARD",)),
    ("amex 378282246310005", ("CREDIT_CARD",)),
    ("4111 1111 1111 1112 fails the Luhn check", ()),
    ("order id 1234567890123456", ()),
    # IBAN (mod 97)
    ("IBAN GB82 WEST 1234 5698 7654 32", ("IBAN",)),
    ("DE89370400440532013000 is the account", ("IBAN",)),
    ("FR14 2004 1010 0505 0001 3M02 606", ("IBAN",)),
    ("GB82 WEST 1234 5698 7654 33 has a bad check", ()),
    ("AB12 CDEF GHIJ KLMN", ()),
    # US SSN
    ("SSN 536-90-4399", ("US_SSN",)),
    ("ssn: 536 90 4399", ("US_SSN",)),
    ("000-12-3456 is never issued", ()),
    ("666-12-3456 is never issued", ()),
    ("912-12-3456 is never issued", ()),
    ("536-00-4399 has group 00", ()),
    # IP addresses
    ("ping 10.20.30.40 fails", ("IP_ADDRESS",)),
    ("server at 2001:db8::8a2e:370:7334", ("IP_ADDRESS",)),
    ("999.1.1.1 is not an address", ()),
    ("the time is 10:30:45", ()),
    ("python 3.11.4 released", ()),
    # secrets
    ("key sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2m3N4 leaked", ("SECRET",)),
    ("AWS AKIAIOSFODNN7EXAMPLE in the config", ("SECRET",)),
    ("token ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", ("SECRET",)),
    ("slack xoxb-123456789012-abcdefghij", ("SECRET",)),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", ("SECRET",)),
    ("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----", ()),
    ("the sk- prefix marks OpenAI keys", ()),
    # several at once
    ("mail a@b.io, card 4111111111111111", ("CREDIT_CARD", "EMAIL")),
    ("from 192.168.0.1 as ops@corp.example.com with AKIAIOSFODNN7EXAMPLE", ("SECRET", "EMAIL", "IP_ADDRESS")),
    # plain prompts
    ("How do I reverse a linked list in Java?", ()),
    ("Explain compound interest on a 5% loan over 10 years", ()),
    ("What is the capital of France?", ()),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_table(text: str, expected: tuple[str, ...]) -> None:
    assert pii.kinds(pii.find(text)) == expected


def test_the_table_is_big_enough() -> None:
    positives = sum(1 for _, kinds in CASES if kinds)
    assert len(CASES) >= 40 and positives >= 20 and len(CASES) - positives >= 20


def test_redaction_replaces_every_value_with_its_type() -> None:
    text = "mail jane.roe@example.org, card 4111 1111 1111 1111, ip 10.0.0.7."
    assert pii.redact(text) == "mail [EMAIL], card [CREDIT_CARD], ip [IP_ADDRESS]."


def test_phones_found_inside_long_text_at_the_right_offsets() -> None:
    filler = "log line 2023-01-13 11:40:59 ok; " * 300
    text = filler + "call (415) 555-2671 now" + filler
    [span] = pii.find(text)
    assert span.kind == "PHONE" and text[span.start : span.end] == "(415) 555-2671"


def test_a_card_number_is_not_also_a_phone() -> None:
    spans = pii.find("4111 1111 1111 1111")
    assert [s.kind for s in spans] == ["CREDIT_CARD"]


@pytest.mark.parametrize(("digits", "ok"), [("4111111111111111", True), ("79927398713", True), ("79927398710", False)])
def test_luhn(digits: str, ok: bool) -> None:
    assert pii.luhn_ok(digits) is ok


@pytest.mark.parametrize(("iban", "ok"), [("GB82WEST12345698765432", True), ("GB82WEST12345698765433", False), ("GB82", False)])
def test_iban_check(iban: str, ok: bool) -> None:
    assert pii.iban_ok(iban) is ok
