"""Stream stats and trimming against a real Redis (SPEC §5.5: never trim what a group still needs)."""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import Redis

from service.keys import Keys
from service.stats import StreamAdmin
from tests.helpers import entries
from tests.stream_helpers import DEAD, EVENTS, add_events


def read_and_ack(r: redis_sync.Redis, group: str, read: int, ack: int) -> list[str]:
    """Group ``group`` reads ``read`` new entries and acknowledges the first ``ack`` of them."""
    reply: Any = r.xreadgroup(group, "c", {EVENTS: ">"}, count=read)
    ids = [str(entry_id) for _, batch in reply for entry_id, _ in batch]
    if ack:
        r.xack(EVENTS, group, *ids[:ack])
    return ids


def unacknowledged(r: redis_sync.Redis, group: str, ids: list[str]) -> set[str]:
    """Entries the group has not acknowledged: pending, or not delivered yet."""
    info = {g["name"]: g for g in r.xinfo_groups(EVENTS)}[group]
    pending = {str(p["message_id"]) for p in r.xpending_range(EVENTS, group, "-", "+", 1000)}
    last = tuple(int(part) for part in info["last-delivered-id"].split("-"))
    undelivered = {i for i in ids if tuple(int(part) for part in i.split("-")) > last}
    return pending | undelivered


@pytest.mark.parametrize(
    ("a", "b", "kept_from"),
    [
        ((6, 4), (3, 3), 3),  # b has delivered 3 entries, all acked: entry 4 onwards is needed
        ((6, 4), (8, 8), 4),  # a still has entries 5 and 6 pending
        ((2, 0), (9, 9), 0),  # a has entry 1 pending: nothing can go
        ((10, 10), (10, 10), 10),  # everything acknowledged by both
    ],
    ids=["b-behind", "a-pending", "oldest-pending-first", "all-acked"],
)
async def test_trim_never_removes_an_entry_some_group_has_not_acknowledged(
    redis: Redis, sync_redis: redis_sync.Redis, a: tuple[int, int], b: tuple[int, int], kept_from: int
) -> None:
    ids = add_events(sync_redis, 10)
    for group, (read, ack) in (("a", a), ("b", b)):
        sync_redis.xgroup_create(EVENTS, group, "0")
        read_and_ack(sync_redis, group, read, ack)
    needed = unacknowledged(sync_redis, "a", ids) | unacknowledged(sync_redis, "b", ids)

    result = await StreamAdmin(redis, Keys()).trim()

    remaining = [entry_id for entry_id, _ in entries(sync_redis, EVENTS)]
    assert remaining == ids[kept_from:]
    assert result.removed == kept_from
    assert needed <= set(remaining)


async def test_trim_removes_nothing_when_the_stream_has_no_group(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    add_events(sync_redis, 5)
    result = await StreamAdmin(redis, Keys()).trim()
    assert (result.removed, result.min_id) == (0, "")
    assert sync_redis.xlen(EVENTS) == 5


async def test_trim_of_a_missing_stream_is_a_no_op(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    result = await StreamAdmin(redis, Keys()).trim()
    assert (result.removed, result.min_id) == (0, "")


async def test_trim_keeps_entries_of_a_group_that_has_read_nothing(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    add_events(sync_redis, 3)
    sync_redis.xgroup_create(EVENTS, "new", "0")
    sync_redis.xgroup_create(EVENTS, "done", "$")
    assert (await StreamAdmin(redis, Keys()).trim()).removed == 0
    assert sync_redis.xlen(EVENTS) == 3


async def test_stats_report_length_groups_pending_lag_and_dead_letters(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    ids = add_events(sync_redis, 5)
    sync_redis.xgroup_create(EVENTS, "billing", "0")
    read_and_ack(sync_redis, "billing", 3, 1)  # entries 2 and 3 pending, 4 and 5 not delivered
    sync_redis.xgroup_create(EVENTS, "audit", "$")
    for reason in ("unknown_realm", "unknown_realm", "handler_failed"):
        sync_redis.xadd(DEAD, {"v": "1", "reason": reason})
    oldest_pending_ms = int(ids[1].split("-")[0])

    stats = await StreamAdmin(redis, Keys()).stats(now=(oldest_pending_ms + 2500) / 1000)

    assert stats["length"] == 5
    groups = {g["name"]: g for g in stats["groups"]}
    assert groups["billing"]["pending"] == 2
    assert groups["billing"]["lag"] == 2
    assert groups["billing"]["oldest_pending_id"] == ids[1]
    assert groups["billing"]["oldest_pending_age_seconds"] == 2.5
    assert groups["audit"] | {"consumers": 0} == {
        "name": "audit",
        "consumers": 0,
        "pending": 0,
        "last_delivered_id": ids[-1],
        "lag": 0,
        "oldest_pending_id": None,
        "oldest_pending_age_seconds": None,
    }
    assert stats["oldest_pending_age_seconds"] == 2.5
    assert stats["dead_letters"]["by_reason"] == {"handler_failed": 1, "unknown_realm": 2}
    assert stats["dead_letters"]["total"] == 3


async def test_stats_of_an_empty_database(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    stats = await StreamAdmin(redis, Keys()).stats()
    assert (stats["length"], stats["groups"], stats["oldest_pending_age_seconds"]) == (0, [], None)
    assert stats["dead_letters"]["total"] == 0
