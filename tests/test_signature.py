from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import string
import time

import pytest

from service.errors import SignatureError
from service.signature import find_verifying_token, fingerprint, matches, parse_header, same_token, sign
from tests.helpers import REAL_SIGNATURE, REAL_TOKEN, SAMPLE_SIGNATURE, SAMPLE_TOKEN, fixture_bytes


def test_known_answer_vector_from_a_real_delivery() -> None:
    body = fixture_bytes("legacy-real-signed.json")
    assert sign(REAL_TOKEN, body) == REAL_SIGNATURE
    assert matches(REAL_TOKEN, body, parse_header([REAL_SIGNATURE]))


def test_known_answer_vector_of_intuits_cloudevents_sample() -> None:
    body = fixture_bytes("cloudevents-intuit-sample.json")
    assert len(body) == 300
    assert sign(SAMPLE_TOKEN, body) == SAMPLE_SIGNATURE


def test_a_single_changed_byte_fails() -> None:
    body = fixture_bytes("legacy-real-signed.json")
    assert not matches(REAL_TOKEN, body + b" ", parse_header([REAL_SIGNATURE]))
    assert not matches(REAL_TOKEN + "x", body, parse_header([REAL_SIGNATURE]))


def test_non_ascii_token_and_body_are_signed_as_utf8_bytes() -> None:
    body = '{"name":"Café ☕"}'.encode()
    expected = base64.b64encode(hmac.new("tøken".encode(), body, hashlib.sha256).digest()).decode()
    assert sign("tøken", body) == expected


_GOOD = REAL_SIGNATURE
_RAW = base64.b64decode(_GOOD)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        pytest.param([], "missing", id="absent"),
        pytest.param([""], "empty", id="empty"),
        pytest.param([_GOOD, _GOOD], "repeated", id="sent-twice"),
        pytest.param([_RAW.hex()], "malformed", id="hex"),
        pytest.param([base64.urlsafe_b64encode(_RAW).decode()], "malformed", id="urlsafe-alphabet")
        if "+" in _GOOD or "/" in _GOOD
        else pytest.param(["-" * 43 + "="], "malformed", id="urlsafe-alphabet"),
        pytest.param([_GOOD.rstrip("=")], "malformed", id="no-padding"),
        pytest.param([_GOOD[:-2] + "=="], "malformed", id="wrong-length"),
        pytest.param([" " + _GOOD[1:]], "malformed", id="leading-space"),
        pytest.param([_GOOD[:-1] + " "], "malformed", id="trailing-space"),
        pytest.param(["é" * 44], "malformed", id="non-ascii"),
        pytest.param([base64.b64encode(_RAW + b"x").decode()], "malformed", id="33-bytes"),
        pytest.param([_GOOD[:42] + "B="], "malformed", id="non-canonical-last-char"),
        pytest.param(["A" * 10_000], "malformed", id="huge"),
        pytest.param(["\x00" * 44], "malformed", id="nul-bytes"),
    ],
)
def test_malformed_headers_are_one_verification_error(values: list[str], reason: str) -> None:
    with pytest.raises(SignatureError) as caught:
        parse_header(values)
    assert caught.value.reason == reason


@pytest.mark.parametrize("last", list(string.ascii_letters + string.digits + "+/="))
def test_exactly_one_spelling_of_each_signature_is_accepted(last: str) -> None:
    value = _GOOD[:42] + last + "="
    try:
        canonical = base64.b64encode(base64.b64decode(value, validate=True)).decode() == value
    except binascii.Error:
        canonical = False
    if canonical:
        assert parse_header([value]) == base64.b64decode(value)
    else:
        with pytest.raises(SignatureError) as caught:
            parse_header([value])
        assert caught.value.reason == "malformed"


def test_find_verifying_token_tries_each_distinct_token() -> None:
    body = b"[]"
    signature = parse_header([sign("b", body)])
    assert find_verifying_token(["a", "b", "c", "b", ""], body, signature) == "b"
    assert find_verifying_token(["a", "c"], body, signature) is None
    assert find_verifying_token([], body, signature) is None


def test_fingerprint_and_token_equality() -> None:
    assert fingerprint(REAL_TOKEN) == hashlib.sha256(REAL_TOKEN.encode()).hexdigest()[:16]
    assert same_token("tøken", "tøken")
    assert not same_token("tøken", "token")


def test_a_passed_deadline_stops_the_search() -> None:
    body = b"x" * 1000
    signature = parse_header([sign("z", body)])
    with pytest.raises(TimeoutError):
        find_verifying_token(["a", "b", "z"], body, signature, deadline=time.monotonic() - 1)
    assert find_verifying_token(["a", "b", "z"], body, signature, deadline=time.monotonic() + 60) == "z"
