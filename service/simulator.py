"""A simulated Intuit (SPEC §2.3): signed deliveries of both formats for many realms, retried until 200.

Intuit retries every answer but 200 for days; this sender does the same on a compressed schedule
(0.05 s, 0.1 s, 0.2 s ... capped at 1 s) within a bounded total time, and records what it sent and what
was acknowledged, so a test (or an operator, through ``qbo-webhooks simulate``) can check that every
event it sent is in the stream exactly once and that no 200 was given for an event that is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from service.models import Event
from service.payloads import parse_body
from service.signature import sign

ENTITIES = ("Customer", "Invoice", "Payment", "SalesReceipt", "JournalEntry", "Vendor", "Bill", "Item")
OPERATIONS = ("Create", "Update", "Delete", "Merge", "Void", "Emailed")
_VERBS = {"Create": "created", "Update": "updated", "Delete": "deleted", "Merge": "merged", "Void": "void"}
FORMATS = ("legacy", "cloudevents", "mixed")
# Realm ids above 2^53, as real ones are: they must survive as strings.
REALM_BASE = 9_130_350_000_000_000_000


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST as Intuit would send it: exact body bytes, its signature and the events it carries."""

    number: int
    body: bytes
    signature: str
    format: str
    event_ids: tuple[str, ...]

    @property
    def content_type(self) -> str:
        if self.format == "legacy":
            return "application/json"
        return "application/cloudevents-batch+json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Intuit's schedule (10 s, 20 s, 30 s, 5 min ...) compressed: doubling from ``first`` up to ``cap``."""

    first: float = 0.05
    cap: float = 1.0
    give_up_after: float = 60.0  # per delivery

    def delay(self, attempt: int) -> float:
        return float(min(self.cap, self.first * 2 ** max(0, attempt - 1)))


@dataclass(slots=True)
class SimulationReport:
    """What the simulated Intuit sent and what it was told."""

    deliveries: int = 0
    attempts: int = 0
    acknowledged: int = 0  # deliveries that got their 200
    statuses: Counter[str] = field(default_factory=Counter)  # every answer, "no-answer" for none
    sent_event_ids: set[str] = field(default_factory=set)
    acknowledged_event_ids: set[str] = field(default_factory=set)
    unacknowledged: list[int] = field(default_factory=list)  # delivery numbers still without a 200
    seconds: float = 0.0

    @property
    def retries(self) -> int:
        return self.attempts - self.deliveries

    @property
    def non_200(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != "200")

    def summary(self) -> dict[str, Any]:
        return {
            "deliveries": self.deliveries,
            "events_sent": len(self.sent_event_ids),
            "attempts": self.attempts,
            "retries": self.retries,
            "acknowledged": self.acknowledged,
            "non_200": self.non_200,
            "statuses": dict(sorted(self.statuses.items())),
            "unacknowledged": len(self.unacknowledged),
            "seconds": round(self.seconds, 2),
        }


def make_realms(count: int, base: int = REALM_BASE) -> list[str]:
    """``count`` distinct realm ids (digit strings beyond 2^53)."""
    return [str(base + i) for i in range(count)]


def build_deliveries(
    realm_tokens: Mapping[str, str],
    count: int,
    fmt: str = "mixed",
    *,
    seed: int | None = None,
    max_events: int = 5,
    now: float | None = None,
) -> list[Delivery]:
    """``count`` deliveries for the realms given (realm id -> verifier token).

    Each body names only realms of one token (Intuit signs per app). ``mixed`` alternates the formats and
    now and then re-sends events of an earlier delivery in the other format, as an app switching formats
    mid-retry does: those events must still be queued once. Event times start at ``now`` (default: the
    current time), so the same ``seed`` and ``now`` build the same bytes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if not realm_tokens:
        raise ValueError("at least one realm is needed")
    rng = random.Random(seed)
    run = uuid.UUID(int=rng.getrandbits(128)).hex[:10]  # keeps runs' entity ids apart
    by_token: dict[str, list[str]] = {}
    for realm_id, token in realm_tokens.items():
        by_token.setdefault(token, []).append(realm_id)
    groups = sorted(by_token.items())
    base = time.time() if now is None else now
    deliveries: list[Delivery] = []
    previous: dict[str, list[list[dict[str, Any]]]] = {}  # per token: a re-send is signed by the same app
    serial = 0
    for number in range(count):
        token, realms = groups[number % len(groups)]
        body_format = fmt if fmt != "mixed" else ("legacy", "cloudevents")[number % 2]
        earlier = previous.setdefault(token, [])
        if fmt == "mixed" and number % 10 == 9 and earlier:
            changes = rng.choice(earlier)  # the same changes again, in whichever format this one is
        else:
            changes = []
            for _ in range(rng.randint(1, max_events)):
                serial += 1
                changes.append(_change(rng, rng.choice(realms), f"{run}-{serial}", base + serial / 1000))
            earlier.append(changes)
        body = _legacy_body(changes) if body_format == "legacy" else _cloudevents_body(rng, changes)
        event_ids = tuple(item.event_id for item in parse_body(body).items if isinstance(item, Event))
        deliveries.append(Delivery(number, body, sign(token, body), body_format, event_ids))
    return deliveries


def _change(rng: random.Random, realm_id: str, entity_id: str, moment: float) -> dict[str, Any]:
    operation = rng.choice(OPERATIONS)
    return {
        "realm_id": realm_id,
        "entity": rng.choice(ENTITIES),
        "entity_id": entity_id,
        "operation": operation,
        "deleted_id": f"{entity_id}-old" if operation == "Merge" else "",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment * 1000) % 1000:03d}Z",
    }


def _legacy_body(changes: Sequence[dict[str, Any]]) -> bytes:
    notifications: dict[str, list[dict[str, str]]] = {}
    for change in changes:
        entity = {
            "name": change["entity"],
            "id": change["entity_id"],
            "operation": change["operation"],
            "lastUpdated": change["time"],
        }
        if change["deleted_id"]:
            entity["deletedId"] = change["deleted_id"]
        notifications.setdefault(change["realm_id"], []).append(entity)
    document = {
        "eventNotifications": [
            {"realmId": realm_id, "dataChangeEvent": {"entities": entities}}
            for realm_id, entities in notifications.items()
        ]
    }
    return orjson.dumps(document)


def _cloudevents_body(rng: random.Random, changes: Sequence[dict[str, Any]]) -> bytes:
    events = []
    for change in changes:
        verb = _VERBS.get(change["operation"], change["operation"].lower())
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": str(uuid.UUID(int=rng.getrandbits(128))),
            "source": "intuit.simulator",
            "type": f"qbo.{change['entity'].lower()}.{verb}.v1",
            "datacontenttype": "application/json",
            "time": change["time"],
            "intuitentityid": change["entity_id"],
            "intuitaccountid": change["realm_id"],
        }
        if change["deleted_id"]:
            event["data"] = {"deletedId": change["deleted_id"]}
        events.append(event)
    return orjson.dumps(events)


class Simulator:
    """Sends deliveries to ``url`` with ``concurrency`` senders, retrying each until it gets a 200."""

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 8,
        schedule: RetrySchedule | None = None,
        request_timeout: float = 5.0,
        on_answer: Callable[[Delivery, str], None] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._concurrency = max(1, concurrency)
        self._schedule = schedule or RetrySchedule()
        self._timeout = request_timeout
        self._on_answer = on_answer

    async def run(self, deliveries: Sequence[Delivery], *, deadline_seconds: float = 120.0) -> SimulationReport:
        """Deliver everything (or stop retrying at the deadline); never raises for a failed attempt."""
        report = SimulationReport(deliveries=len(deliveries))
        for delivery in deliveries:
            report.sent_event_ids.update(delivery.event_ids)
        started = time.monotonic()
        deadline = started + deadline_seconds
        pending = list(reversed(deliveries))

        async def sender() -> None:
            while pending:
                await self._deliver(pending.pop(), report, deadline)

        await asyncio.gather(*(sender() for _ in range(self._concurrency)))
        report.seconds = time.monotonic() - started
        return report

    async def _deliver(self, delivery: Delivery, report: SimulationReport, deadline: float) -> None:
        give_up = min(deadline, time.monotonic() + self._schedule.give_up_after)
        attempt = 0
        while True:
            attempt += 1
            report.attempts += 1
            status = await self.send(delivery)
            report.statuses[status] += 1
            if self._on_answer is not None:
                self._on_answer(delivery, status)
            if status == "200":
                report.acknowledged += 1
                report.acknowledged_event_ids.update(delivery.event_ids)
                return
            pause = self._schedule.delay(attempt)
            if time.monotonic() + pause > give_up:
                report.unacknowledged.append(delivery.number)
                return
            await asyncio.sleep(pause)

    async def send(self, delivery: Delivery) -> str:
        """One attempt: the status code as text, or ``"no-answer"`` (refused, reset, timed out)."""
        try:
            async with asyncio.timeout(self._timeout):
                return str(await self._post(delivery))
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return "no-answer"

    async def _post(self, delivery: Delivery) -> int:
        context = ssl.create_default_context() if self._tls else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context)
        try:
            head = (
                f"POST {self._path} HTTP/1.1\r\n"
                f"host: {self._host}:{self._port}\r\n"
                f"content-type: {delivery.content_type}\r\n"
                f"content-length: {len(delivery.body)}\r\n"
                f"intuit-signature: {delivery.signature}\r\n"
                f"intuit-t-id: {uuid.uuid4()}\r\n"
                "user-agent: qbo-webhooks-simulator\r\n"
                "connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + delivery.body)
            await writer.drain()
            return await read_status(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def read_status(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (status line, headers, Content-Length body) and return its status."""
    status_line = await reader.readline()
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError("no HTTP answer")
    length = 0
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(line, None)
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return int(parts[1])
