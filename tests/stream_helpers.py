"""Helpers for consumer, dead-letter and stream tests: events appended the way the receiver writes them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis as redis_sync

from service.models import Event
from service.payloads import compact_json, event_id

EVENTS = "qbo:events"
DEAD = "qbo:events:dead"


def make_event(n: int, realm_id: str = "9130350000000001") -> Event:
    """A distinct Customer update event number ``n``, as the receiver normalises it."""
    occurred = f"2026-03-01T10:00:{n % 60:02d}.{n // 60:03d}Z"
    payload = {"name": "Customer", "id": str(n), "operation": "Update", "lastUpdated": occurred}
    return Event(
        event_id=event_id(realm_id, "Customer", str(n), "Update", "", occurred),
        source_id="",
        realm_id=realm_id,
        entity="Customer",
        entity_id=str(n),
        operation="Update",
        deleted_id="",
        occurred_at=occurred,
        type="qbo.customer.updated.v1",
        format="legacy",
        payload=compact_json(payload),
        environment="sandbox",
    )


def add_events(r: redis_sync.Redis, count: int, first: int = 1) -> list[str]:
    """Append ``count`` events; returns their entry ids."""
    return [
        str(r.xadd(EVENTS, make_event(n).stream_fields("2026-03-01T10:00:00.000Z")))  # type: ignore[arg-type]
        for n in range(first, first + count)
    ]


def pending_count(r: redis_sync.Redis, group: str) -> int:
    return int(r.xpending(EVENTS, group)["pending"])


async def eventually(condition: Callable[[], bool], within: float = 5.0, interval: float = 0.01) -> None:
    """Wait until ``condition()`` holds; fail the test after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(interval)


def wait_for(condition: Callable[[], bool], within: float = 20.0) -> None:
    """The blocking form of ``eventually``, for tests that drive other processes."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.02)
