"""The ``intuit-signature`` check (SPEC §2.1): pure functions over exact bytes, constant-time.

Every malformed header becomes one ``SignatureError``; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import time
from collections.abc import Iterable, Sequence

from service.errors import SignatureError

HEADER = "intuit-signature"
_DIGEST_SIZE = hashlib.sha256().digest_size  # 32 bytes, so 44 base64 characters with one '=' of padding
_ENCODED_LENGTH = 44
_CANONICAL_LAST = frozenset("AEIMQUYcgkosw048")  # the base64 digits whose low 2 bits are zero


def parse_header(values: Sequence[str]) -> bytes:
    """Return the 32 signature bytes of the header's values, or raise ``SignatureError``.

    ``values`` are all the values of the header as received (case-insensitive name): it must be sent
    exactly once, as strict standard base64 (``+``, ``/``, ``=``) of exactly 32 bytes.
    """
    if not values:
        raise SignatureError("missing")
    if len(values) > 1:
        raise SignatureError("repeated")
    value = values[0]
    if not value:
        raise SignatureError("empty")
    if len(value) != _ENCODED_LENGTH or not value.isascii():
        raise SignatureError("malformed")
    # Reject non-canonical encodings (stray bits in the last character) so one signature has one spelling: 32 bytes
    # are 42 characters and 4 bits, so the 43rd character's low 2 bits must be zero, and one "=" must follow.
    if value[42] not in _CANONICAL_LAST or value[43] != "=":
        raise SignatureError("malformed")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed") from None
    if len(raw) != _DIGEST_SIZE:
        raise SignatureError("malformed")
    return raw


def sign(token: str, body: bytes) -> str:
    """The ``intuit-signature`` value Intuit sends for ``body`` under verifier ``token``."""
    return base64.b64encode(digest(token, body)).decode("ascii")


def digest(token: str, body: bytes) -> bytes:
    """HMAC-SHA256 of the raw body bytes, keyed by the token's UTF-8 bytes."""
    return hmac.digest(token.encode("utf-8"), body, "sha256")


def matches(token: str, body: bytes, signature: bytes) -> bool:
    """Constant-time comparison of the body's HMAC under ``token`` with the received signature bytes."""
    return hmac.compare_digest(digest(token, body), signature)


def find_verifying_token(
    tokens: Iterable[str], body: bytes, signature: bytes, deadline: float | None = None
) -> str | None:
    """The first of ``tokens`` (each tried once) whose HMAC of ``body`` equals ``signature``, else ``None``.

    Every candidate is computed and compared, so how long this takes does not tell which one matched.
    With a ``deadline`` (``time.monotonic()``), raises ``TimeoutError`` once it passes with work left.
    """
    found: str | None = None
    seen: set[str] = set()
    for token in tokens:
        if not token or token in seen:
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("signature check exceeded the response budget")
        seen.add(token)
        if matches(token, body, signature) and found is None:
            found = token
    return found


def same_token(a: str, b: str) -> bool:
    """Constant-time token equality (works for non-ASCII tokens, unlike ``compare_digest`` on ``str``).

    The same object is equal without comparing: the usual case (a realm's cached token is the candidate
    that verified), and whether two of our own strings are one object says nothing about their bytes.
    """
    return a is b or hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@functools.lru_cache(maxsize=4096)
def fingerprint(token: str) -> str:
    """First 16 hex characters of SHA-256 of the token: names a token in dead letters without revealing it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]
