"""The recorder's Lua call against a real Redis: dedupe marks and entries together, group commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import Redis

from service import queue
from service.errors import StorageUnavailable
from service.keys import Keys
from service.models import DeadLetter, DeadLetterReason, Event
from service.queue import StreamRecorder
from tests.helpers import entries


def make_event(n: int, realm: str = "1") -> Event:
    return Event(
        event_id=f"{n:032x}",
        source_id=f"s{n}",
        realm_id=realm,
        entity="Invoice",
        entity_id=str(n),
        operation="Update",
        deleted_id="",
        occurred_at="2026-01-01T00:00:00Z",
        type="qbo.invoice.updated.v1",
        format="cloudevents",
        payload="{}",
        environment="sandbox",
    )


Recorders = Callable[..., StreamRecorder]


@pytest.fixture
async def recorders(redis: Redis) -> AsyncIterator[Recorders]:
    """Makes recorders on the suite's Redis and closes their connections afterwards."""
    made: list[StreamRecorder] = []

    def make(**options: Any) -> StreamRecorder:
        made.append(StreamRecorder(redis, Keys(), **options))
        return made[-1]

    yield make
    for recorder in made:
        await recorder.close()


def letter(n: int) -> DeadLetter:
    return DeadLetter(DeadLetterReason.INVALID_EVENT, "1", f"bad {n}", "abcd", "[]")


async def test_marks_and_entries_are_written_together(recorders: Recorders, sync_redis: redis_sync.Redis) -> None:
    recorder = recorders(dedupe_ttl_seconds=3600)
    result = await recorder.record([make_event(1), make_event(2), make_event(1)], [letter(1)], "t")
    assert (result.accepted, result.duplicates, result.dead_lettered) == (2, 1, 1)
    queued = [fields["event_id"] for _, fields in entries(sync_redis, "qbo:events")]
    marks = sorted(key.removeprefix("qbo:seen:") for key in sync_redis.scan_iter("qbo:seen:*"))
    assert sorted(queued) == marks == [f"{1:032x}", f"{2:032x}"]
    assert 3500 < sync_redis.ttl(f"qbo:seen:{1:032x}") <= 3600
    assert sync_redis.xlen("qbo:events:dead") == 1
    again = await recorder.record([make_event(2)], [], "t")
    assert (again.accepted, again.duplicates) == (0, 1)


async def test_concurrent_requests_are_group_committed(recorders: Recorders, sync_redis: redis_sync.Redis) -> None:
    recorder = recorders()
    await recorder.preload()
    sync_redis.config_resetstat()
    results = await asyncio.gather(*(recorder.record([make_event(n)], [], "t") for n in range(200)))
    assert all(r.accepted == 1 for r in results)
    assert sync_redis.xlen("qbo:events") == 200
    calls = sync_redis.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls < 200  # concurrent requests shared script calls
    assert sum(r.accepted for r in results) == 200


async def test_a_group_is_capped_by_its_events(
    recorders: Recorders, sync_redis: redis_sync.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls carry at most MAX_ITEMS_PER_CALL events and letters; a request above it goes alone, whole."""
    monkeypatch.setattr(queue, "MAX_ITEMS_PER_CALL", 5)
    recorder = recorders()
    await recorder.preload()
    sync_redis.config_resetstat()
    sizes = [3, 3, 2, 7, 1, 1]  # groups of at most 5 items: [3], [3, 2], [7], [1, 1]
    requests = [[make_event(100 * i + j) for j in range(size)] for i, size in enumerate(sizes)]
    results = await asyncio.gather(*(recorder.record(events, [], "t") for events in requests))
    assert [r.accepted for r in results] == sizes
    assert sync_redis.xlen("qbo:events") == sum(sizes)
    assert sync_redis.info("commandstats")["cmdstat_evalsha"]["calls"] == 4


async def test_nothing_to_record_touches_nothing(recorders: Recorders, sync_redis: redis_sync.Redis) -> None:
    recorder = recorders()
    result = await recorder.record([], [], "t")
    assert (result.accepted, result.duplicates, result.dead_lettered) == (0, 0, 0)
    assert sync_redis.dbsize() == 0


async def test_dead_letter_stream_is_capped(recorders: Recorders, sync_redis: redis_sync.Redis) -> None:
    recorder = recorders(dead_letter_maxlen=100)
    for n in range(30):
        await recorder.record([], [letter(n) for _ in range(10)], "t")
    assert sync_redis.xlen("qbo:events:dead") < 300
    assert recorder.dead_letter_cap_reached > 0


async def test_a_call_that_cannot_be_built_fails_its_group_only(
    recorders: Recorders, sync_redis: redis_sync.Redis
) -> None:
    recorder = recorders()
    # A value the call's JSON argument cannot hold: building the call fails (no domain code makes one).
    unbuildable = DeadLetter(DeadLetterReason.INVALID_EVENT, "1", "d", "f", "{}", extra={"x": object()})  # type: ignore[dict-item]
    with pytest.raises(StorageUnavailable):
        await recorder.record([make_event(1)], [unbuildable], "t")
    assert (await recorder.record([make_event(2)], [], "t")).accepted == 1  # the line was given back
    assert sync_redis.xlen("qbo:events") == 1
