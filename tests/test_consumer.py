"""The consumer library against a real Redis: sharing, reclaiming, dead-lettering, draining, recovery (SPEC §5.5)."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from typing import Any

import orjson
import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.consumer import Consumer, run
from service.entries import V1_FIELDS, SchemaError, StreamEvent
from tests.helpers import entries
from tests.stream_helpers import DEAD, EVENTS, add_events, eventually, make_event, pending_count


async def _stop_later(worker: Consumer, condition: Any) -> None:
    try:
        await eventually(condition)
    finally:
        worker.stop()


async def test_iterator_yields_typed_events_and_ack_removes_them_from_pending(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    ids = add_events(sync_redis, 3)
    seen: list[StreamEvent] = []
    async with Consumer(redis, group="billing", consumer="worker-1", block=0.1) as consumer:
        async for event in consumer:
            seen.append(event)
            await event.ack()
            if len(seen) == 3:
                break
    assert [e.entry_id for e in seen] == ids
    first = seen[0]
    expected = make_event(1)
    assert (first.v, first.event_id, first.entity, first.entity_id, first.operation) == (
        "1",
        expected.event_id,
        "Customer",
        "1",
        "Update",
    )
    assert first.environment == "sandbox"
    assert first.deliveries == 1
    assert set(first.fields) == set(V1_FIELDS)  # the raw entry is kept
    assert first.payload_json()["id"] == "1"
    assert pending_count(sync_redis, "billing") == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"v": "2"}, "unsupported schema version '2'"),
        ({}, "unsupported schema version None"),
        ({"v": "1", "event_id": "x"}, "lacks source_id"),
    ],
    ids=["future-version", "no-version", "missing-fields"],
)
def test_entries_that_are_not_v1_events_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        StreamEvent.from_entry("1-0", fields)


async def test_new_group_starts_at_0_by_default_and_at_the_end_when_asked(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    add_events(sync_redis, 2)
    async with Consumer(redis, group="from-start"), Consumer(redis, group="from-end", start="$"):
        pass
    groups = {g["name"]: g for g in sync_redis.xinfo_groups(EVENTS)}
    assert groups["from-start"]["last-delivered-id"] == "0-0"
    assert groups["from-end"]["last-delivered-id"] == sync_redis.xrevrange(EVENTS, count=1)[0][0]  # type: ignore[index]


async def test_existing_group_is_benign_but_other_errors_are_raised(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    consumer = Consumer(redis, group="g")
    await consumer.ensure_group()
    await consumer.ensure_group()  # BUSYGROUP: fine
    sync_redis.delete(EVENTS)
    sync_redis.set(EVENTS, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await consumer.ensure_group()


async def test_two_consumers_in_one_group_share_the_work_and_never_both_process_an_entry(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    ids = add_events(sync_redis, 60)
    handled: collections.Counter[str] = collections.Counter()
    by_worker: dict[str, set[str]] = {"a": set(), "b": set()}

    def handler_for(name: str) -> Any:
        async def handle(event: StreamEvent) -> None:
            await asyncio.sleep(0.005)
            handled[event.entry_id] += 1
            by_worker[name].add(event.entry_id)

        return handle

    stop = asyncio.Event()
    workers = [
        asyncio.create_task(
            run(handler_for(name), redis=redis, group="billing", consumer=name, concurrency=3, block=0.1, stop=stop)
        )
        for name in ("a", "b")
    ]
    await eventually(lambda: len(handled) == 60)
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*workers)
    assert sorted(handled) == sorted(ids)
    assert set(handled.values()) == {1}
    assert by_worker["a"]
    assert by_worker["b"]
    assert not by_worker["a"] & by_worker["b"]
    assert pending_count(sync_redis, "billing") == 0


async def test_an_entry_of_a_consumer_that_died_mid_handler_is_reclaimed_by_another(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    (entry_id,) = add_events(sync_redis, 1)
    sync_redis.xgroup_create(EVENTS, "billing", "0")
    # The dead consumer: it read the entry and never acknowledged it.
    sync_redis.xreadgroup("billing", "dead-worker", {EVENTS: ">"}, count=1)
    got: list[StreamEvent] = []

    async def handle(event: StreamEvent) -> None:
        got.append(event)

    worker = Consumer(redis, group="billing", consumer="survivor", claim_idle=0.2, block=0.05)
    async with worker:
        await asyncio.gather(
            worker.process(handle), _stop_later(worker, lambda: pending_count(sync_redis, "billing") == 0)
        )
    assert [(e.entry_id, e.deliveries) for e in got] == [(entry_id, 2)]


async def test_a_failed_handler_is_retried_after_claim_idle_and_acked_once_it_succeeds(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    add_events(sync_redis, 1)
    attempts: list[int] = []

    async def flaky(event: StreamEvent) -> None:
        attempts.append(event.deliveries)
        if len(attempts) == 1:
            raise RuntimeError("temporary")

    worker = Consumer(redis, group="billing", claim_idle=0.1, block=0.05)
    async with worker:
        await asyncio.gather(worker.process(flaky), _stop_later(worker, lambda: len(attempts) == 2))
    assert attempts == [1, 2]
    assert pending_count(sync_redis, "billing") == 0
    assert sync_redis.xlen(DEAD) == 0


async def test_a_handler_failing_max_deliveries_times_dead_letters_the_entry_exactly_once(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    (entry_id,) = add_events(sync_redis, 1)
    calls: list[tuple[str, int]] = []

    def failing_for(name: str) -> Any:
        async def handle(event: StreamEvent) -> None:
            calls.append((name, event.deliveries))
            raise ValueError("no such customer")

        return handle

    # Two consumers of the group compete for the retries; the delivery count is the group's.
    workers = [
        Consumer(redis, group="billing", consumer=n, claim_idle=0.05, max_deliveries=3, block=0.02) for n in "ab"
    ]
    async with workers[0], workers[1]:
        runs = [asyncio.create_task(w.process(failing_for(w.name))) for w in workers]
        await eventually(lambda: sync_redis.xlen(DEAD) >= 1)
        await asyncio.sleep(0.4)  # many claim rounds: nothing is delivered or dead-lettered again
        for w in workers:
            w.stop()
        await asyncio.gather(*runs)
    assert sorted(d for _, d in calls) == [1, 2, 3]
    ((_, letter),) = entries(sync_redis, DEAD)
    original = make_event(1)
    assert letter["reason"] == "handler_failed"
    assert letter["error"] == "ValueError: no such customer"
    assert (letter["v"], letter["verified_by"], letter["realm_id"]) == ("1", "", original.realm_id)
    assert (letter["event_id"], letter["entry_id"]) == (original.event_id, entry_id)
    assert letter["payload"] == original.payload
    assert orjson.loads(letter["entry"])["event_id"] == original.event_id
    assert "detail" in letter
    assert "received_at" in letter
    assert pending_count(sync_redis, "billing") == 0  # acknowledged together with the dead-lettering


async def test_an_entry_never_acknowledged_is_dead_lettered_after_max_deliveries(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    (entry_id,) = add_events(sync_redis, 1)
    sync_redis.xgroup_create(EVENTS, "billing", "0")
    # Two consumers died holding it: delivered twice, never acknowledged.
    sync_redis.xreadgroup("billing", "crashed-1", {EVENTS: ">"}, count=1)
    sync_redis.xclaim(EVENTS, "billing", "crashed-2", 0, [entry_id])
    handled: list[StreamEvent] = []

    async def handle(event: StreamEvent) -> None:
        handled.append(event)

    worker = Consumer(redis, group="billing", claim_idle=0.05, max_deliveries=2, block=0.02)
    async with worker:
        await asyncio.gather(worker.process(handle), _stop_later(worker, lambda: sync_redis.xlen(DEAD) == 1))
    assert handled == []
    ((_, letter),) = entries(sync_redis, DEAD)
    assert letter["error"].startswith("DeliveryLimitExceeded")
    assert pending_count(sync_redis, "billing") == 0


async def test_an_entry_of_an_unknown_schema_version_is_not_handed_out_and_ends_in_dead_letters(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    sync_redis.xadd(EVENTS, {"v": "9", "event_id": "e"})
    handled: list[StreamEvent] = []

    async def handle(event: StreamEvent) -> None:
        handled.append(event)

    worker = Consumer(redis, group="billing", max_deliveries=1, block=0.02)
    async with worker:
        await asyncio.gather(worker.process(handle), _stop_later(worker, lambda: sync_redis.xlen(DEAD) == 1))
    assert handled == []
    ((_, letter),) = entries(sync_redis, DEAD)
    assert letter["error"].startswith("SchemaError: ")


async def test_stop_drains_a_slow_handler_and_reads_nothing_new(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    (first,) = add_events(sync_redis, 1)
    started, finished = asyncio.Event(), []

    async def slow(event: StreamEvent) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(event.entry_id)

    worker = Consumer(redis, group="billing", block=0.05)
    async with worker:
        task = asyncio.create_task(worker.process(slow, concurrency=4, drain_timeout=5))
        await started.wait()
        worker.stop()
        await asyncio.sleep(0.1)  # the read that was waiting when stop() came is abandoned
        add_events(sync_redis, 1, first=2)  # arrives after stop: not read
        await asyncio.wait_for(task, 3)
    assert finished == [first]
    assert pending_count(sync_redis, "billing") == 0
    (group,) = sync_redis.xinfo_groups(EVENTS)
    assert group["last-delivered-id"] == first


async def test_handlers_still_running_after_the_drain_timeout_are_cancelled_and_left_pending(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    add_events(sync_redis, 1)
    started = asyncio.Event()

    async def stuck(event: StreamEvent) -> None:
        started.set()
        await asyncio.sleep(30)

    worker = Consumer(redis, group="billing", block=0.05)
    async with worker:
        task = asyncio.create_task(worker.process(stuck, drain_timeout=0.2))
        await started.wait()
        worker.stop()
        await asyncio.wait_for(task, 2)
    assert pending_count(sync_redis, "billing") == 1


@pytest.mark.parametrize("deletion", ["group", "stream"])
async def test_a_group_or_stream_deleted_under_a_running_consumer_is_recreated_at_0(
    redis: Redis, sync_redis: redis_sync.Redis, deletion: str
) -> None:
    add_events(sync_redis, 1)
    handled: list[str] = []

    async def handle(event: StreamEvent) -> None:
        handled.append(event.entity_id)

    worker = Consumer(redis, group="billing", block=0.05)
    async with worker:
        task = asyncio.create_task(worker.process(handle))
        await eventually(lambda: handled == ["1"])
        if deletion == "group":
            assert sync_redis.xgroup_destroy(EVENTS, "billing")
        else:
            assert sync_redis.delete(EVENTS) == 1
        await asyncio.sleep(0.1)
        add_events(sync_redis, 1, first=2)
        await eventually(lambda: "2" in handled)
        worker.stop()
        await task
    # Re-created at 0: a surviving stream is read again from its start (duplicates, never loss).
    assert handled == (["1", "1", "2"] if deletion == "group" else ["1", "2"])
    assert pending_count(sync_redis, "billing") == 0


async def test_sync_handlers_run_in_a_thread(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    add_events(sync_redis, 2)
    handled: list[str] = []
    worker = Consumer(redis, group="billing", block=0.05)
    async with worker:
        await asyncio.gather(
            worker.process(lambda event: handled.append(event.entity_id), concurrency=2),
            _stop_later(worker, lambda: pending_count(sync_redis, "billing") == 0 and len(handled) == 2),
        )
    assert sorted(handled) == ["1", "2"]


async def test_a_client_without_decoded_responses_is_refused(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    with pytest.raises(ValueError, match="decode_responses"):
        Consumer(client, group="g")
    await client.aclose()


def test_the_consumer_library_imports_without_starlette() -> None:
    code = "import sys, service.consumer; sys.exit('starlette' in sys.modules or 'uvicorn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


async def test_concurrency_bounds_the_handlers_running_at_once(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    add_events(sync_redis, 12)
    running, peak, done = 0, 0, []

    async def handle(event: StreamEvent) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.03)
        running -= 1
        done.append(event.entry_id)

    worker = Consumer(redis, group="billing", block=0.05)
    async with worker:
        await asyncio.gather(worker.process(handle, concurrency=3), _stop_later(worker, lambda: len(done) == 12))
    assert peak == 3
