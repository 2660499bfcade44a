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
from collections.abc import Collection, Mapping, Sequence
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
    def cached(self, realm_ids: Collection[str]) -> dict[str, RealmRoute] | None: ...

    async def routes(
        self, realm_ids: Collection[str], *, refresh: bool = False
    ) -> tuple[dict[str, RealmRoute | None], set[str]]: ...

    async def known_tokens(self) -> tuple[str, ...]: ...


class Recorder(Protocol):
    async def record(
        self, events: Sequence[Event], letters: Sequence[DeadLetter], received_at: str
    ) -> RecordResult: ...

    def enqueue(
        self,
        events: Sequence[Event],
        letters: Sequence[DeadLetter],
        received_at: str,
        done: asyncio.Future[RecordResult],
    ) -> None: ...

    def flush(self) -> None: ...


# Plain classes, not dataclasses: compiled (service/compiled.py), a dataclass's __init__ would still run as Python.
class IngestReport:
    """What a delivery produced; also the material of the request's log line and metrics."""

    __slots__ = ("accepted", "dead_lettered", "duplicates", "format", "realms", "reasons")

    def __init__(self, realms: int = 0, format: str = "") -> None:
        self.realms = realms
        self.accepted = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.reasons: dict[str, int] = {}
        self.format = format

    def __repr__(self) -> str:
        return (
            f"IngestReport(realms={self.realms}, accepted={self.accepted}, duplicates={self.duplicates}, "
            f"dead_lettered={self.dead_lettered}, reasons={self.reasons!r}, format={self.format!r})"
        )

    def _fields(self) -> tuple[int, int, int, int, dict[str, int], str]:
        return (self.realms, self.accepted, self.duplicates, self.dead_lettered, self.reasons, self.format)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IngestReport):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced


class _Delivery:
    """A delivery waiting for the next batch; ``done`` gets its write's result, or ``None``: take the general path."""

    __slots__ = ("body", "done", "parsed", "report", "signature")

    def __init__(self, body: bytes, signature: bytes, done: asyncio.Future[RecordResult | None]) -> None:
        self.body = body
        self.signature = signature
        self.done = done
        self.parsed: ParsedBody | None = None
        self.report: IngestReport | None = None


class Ingestor:
    """Authenticates a delivery and records every event of it exactly once.

    Deliveries are processed in batches: each one joins the pending list, and one callback per event-loop
    turn parses, verifies and routes every delivery that arrived in that turn, then hands their writes to
    the recorder together. The same work done request by request, interleaved with the HTTP server's,
    cost about half as much again per request (``bench/``). A delivery the batch cannot settle from the
    cache alone (a realm not cached, a token that does not verify, a large body) takes the general path.
    """

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
        self._pending: list[_Delivery] = []

    async def ingest(self, body: bytes, signature_headers: Sequence[str]) -> IngestReport:
        """Raises ``SignatureError`` (not authentic; nothing written) or ``StorageUnavailable``."""
        signature = parse_header(signature_headers)  # malformed headers are refused before any Redis I/O
        loop = asyncio.get_running_loop()
        delivery = _Delivery(body, signature, loop.create_future())
        if not self._pending:
            loop.call_soon(self._process_pending)
        self._pending.append(delivery)
        result = await delivery.done
        if result is None or delivery.report is None:
            return await self._ingest(body, signature, delivery.parsed)
        report = delivery.report
        report.accepted, report.duplicates, report.dead_lettered = (
            result.accepted,
            result.duplicates,
            result.dead_lettered,
        )
        return report

    def _process_pending(self) -> None:
        batch, self._pending = self._pending, []
        received_at = utc_timestamp()
        for delivery in batch:
            if delivery.done.done():  # cancelled while it waited (deadline, shutdown): nothing to do
                continue
            try:
                routed = self._route_from_cache(delivery)
            except Exception as exc:  # not expected; answered (and logged) as an internal error, never lost silently
                delivery.done.set_exception(exc)
                continue
            if routed is None:
                delivery.done.set_result(None)
            elif routed[0] or routed[1]:
                self._recorder.enqueue(*routed, received_at, delivery.done)  # type: ignore[arg-type]
            else:
                delivery.done.set_result(RecordResult())
        self._recorder.flush()  # the turn's writes go together

    def _route_from_cache(self, delivery: _Delivery) -> tuple[list[Event], list[DeadLetter]] | None:
        """Events and dead letters of a delivery whose realms are all cached and whose body verifies with
        their cached token; ``None`` for everything else (the general path then decides)."""
        body = delivery.body
        parsed = delivery.parsed = parse_body(body)
        realm_ids = parsed.realm_ids()
        routes = self._routes.cached(realm_ids) if realm_ids else None
        if routes is None:
            return None
        candidates = [route.token for route in routes.values() if route.token]
        candidates.extend(self._app_tokens)
        if len(body) * len(candidates) > _INLINE_HMAC_BYTES:
            return None
        verified = find_verifying_token(candidates, body, delivery.signature)
        if verified is None or _stale(routes, routes.keys(), verified):
            return None  # never decided against a cached token: the general path re-reads (SPEC §4.7)
        report = delivery.report = IngestReport(realms=len(realm_ids), format=parsed.format or "unparseable")
        events, letters = _route(parsed, body, routes, verified)
        for letter in letters:
            report.reasons[letter.reason.value] = report.reasons.get(letter.reason.value, 0) + 1
        return events, letters

    async def _ingest(self, body: bytes, signature: bytes, parsed: ParsedBody | None) -> IngestReport:
        """The general path: any realm may be read from Redis, and any verdict is checked against a fresh read."""
        parsed = parsed or parse_body(body)
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


def _stale(routes: Mapping[str, RealmRoute | None], cached: Collection[str], verified: str | None) -> list[str]:
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
    parsed: ParsedBody, body: bytes, routes: Mapping[str, RealmRoute | None], verified: str
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
