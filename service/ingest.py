"""The use case: parse → look up → verify → route → record (SPEC §4). No HTTP in here.

The invariant it keeps: an event reaches the events stream only if the body verified with *that
event's realm's own* verifier token. Everything else an authentic body carries is dead-lettered with
its reason; an unauthenticated body writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.errors import SignatureError
from service.models import DeadLetter, DeadLetterReason, Event, InvalidEvent, RealmRoute, utc_timestamp
from service.payloads import ParsedBody, parse_body
from service.queue import RecordResult
from service.signature import find_verifying_token, fingerprint, parse_header, same_token

logger = logging.getLogger(__name__)

# Above this many bytes hashed (body size x candidate tokens) the HMACs run in a thread: hashlib
# releases the GIL, so a large body or a long token list does not stall the event loop.
_INLINE_HMAC_BYTES = 256 * 1024


class RouteSource(Protocol):
    async def routes(
        self, realm_ids: Collection[str], *, refresh: bool = False
    ) -> tuple[dict[str, RealmRoute | None], set[str]]: ...

    async def known_tokens(self) -> tuple[str, ...]: ...


class Recorder(Protocol):
    async def record(
        self, events: Sequence[Event], letters: Sequence[DeadLetter], received_at: str
    ) -> RecordResult: ...


@dataclass(slots=True)
class IngestReport:
    """What a delivery produced; also the material of the request's log line and metrics."""

    realms: int = 0
    accepted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    format: str = ""


class Ingestor:
    """Authenticates a delivery and records every event of it exactly once."""

    def __init__(
        self,
        routes: RouteSource,
        recorder: Recorder,
        *,
        app_tokens: Sequence[str] = (),
        budget_seconds: float = 2.0,
        heavy_verifications: int = 2,
    ) -> None:
        self._routes = routes
        self._recorder = recorder
        self._app_tokens = tuple(app_tokens)
        self._budget = budget_seconds
        self._heavy = asyncio.Semaphore(heavy_verifications)

    async def ingest(self, body: bytes, signature_headers: Sequence[str]) -> IngestReport:
        """Raises ``SignatureError`` (not authentic; nothing written) or ``StorageUnavailable``."""
        signature = parse_header(signature_headers)  # malformed headers are refused before any Redis I/O
        parsed = parse_body(body)
        realm_ids = parsed.realm_ids()
        report = IngestReport(realms=len(realm_ids), format=parsed.format or "unparseable")

        routes, cached = await self._routes.routes(realm_ids) if realm_ids else ({}, set())
        verified = await self._verify(body, signature, routes)
        stale = _stale(routes, cached, verified)
        if stale:
            # Never decide against a cached token: re-read, so a new or rotated token works at once (SPEC §4.7).
            fresh, _ = await self._routes.routes(stale, refresh=True)
            routes.update(fresh)
            verified = await self._verify(body, signature, routes)
        if verified is None:
            raise SignatureError("no_candidate_verified")

        events, letters = _route(parsed, body, routes, verified)
        for letter in letters:
            report.reasons[letter.reason.value] = report.reasons.get(letter.reason.value, 0) + 1
        result = await self._recorder.record(events, letters, utc_timestamp())
        report.accepted, report.duplicates, report.dead_lettered = (
            result.accepted,
            result.duplicates,
            result.dead_lettered,
        )
        return report

    async def _verify(self, body: bytes, signature: bytes, routes: dict[str, RealmRoute | None]) -> str | None:
        candidates = [route.token for route in routes.values() if route is not None and route.token]
        if not candidates:
            # No realm of the body has a usable token: try every token we know (SPEC §4.4), so a delivery
            # for a removed or unregistered company is still recognised as authentic and dead-lettered.
            candidates = list(await self._routes.known_tokens())
        candidates.extend(self._app_tokens)
        if len(body) * len(candidates) <= _INLINE_HMAC_BYTES:
            return find_verifying_token(candidates, body, signature)
        # Off the event loop (hashlib releases the GIL), two at a time, and abandoned at the response budget:
        # a flood of large unauthenticated bodies cannot pile up hashing work (SPEC §4.4).
        deadline = time.monotonic() + self._budget
        async with self._heavy:
            return await asyncio.to_thread(find_verifying_token, candidates, body, signature, deadline)


def _stale(routes: dict[str, RealmRoute | None], cached: set[str], verified: str | None) -> list[str]:
    """Cached realms whose cached state would be decided against."""
    stale = []
    for realm_id in cached:
        route = routes[realm_id]
        if route is not None and route.token:
            if verified is None or not same_token(route.token, verified):
                stale.append(realm_id)
        elif verified is not None:
            # An authentic delivery for a realm cached as unregistered: check it was not registered since.
            stale.append(realm_id)
    return stale


def _route(
    parsed: ParsedBody, body: bytes, routes: dict[str, RealmRoute | None], verified: str
) -> tuple[list[Event], list[DeadLetter]]:
    verified_by = fingerprint(verified)
    if parsed.unparseable:
        payload, is_base64 = _raw_payload(body)
        return [], [DeadLetter(DeadLetterReason.UNPARSEABLE, "", parsed.detail, verified_by, payload, is_base64)]
    events: list[Event] = []
    letters: list[DeadLetter] = []
    for item in parsed.items:
        if isinstance(item, InvalidEvent):
            letters.append(
                DeadLetter(DeadLetterReason.INVALID_EVENT, item.realm_id, item.detail, verified_by, item.payload)
            )
            continue
        route = routes.get(item.realm_id)
        if route is None or not route.token:
            letters.append(
                DeadLetter(
                    DeadLetterReason.UNKNOWN_REALM,
                    item.realm_id,
                    "realm has no usable connection",
                    verified_by,
                    item.payload,
                )
            )
        elif not same_token(route.token, verified):
            letters.append(
                DeadLetter(
                    DeadLetterReason.TOKEN_MISMATCH,
                    item.realm_id,
                    "body verified with a token that is not this realm's",
                    verified_by,
                    item.payload,
                )
            )
        else:
            item.environment = route.environment
            events.append(item)
    return events, letters


def _raw_payload(body: bytes) -> tuple[str, bool]:
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), True
