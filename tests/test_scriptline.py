"""The recorder's own connections (``ScriptLine``) against a real Redis: lost scripts, dropped and
restarted connections, refusals, and the fallback to the client when a connection cannot be used."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis as redis_sync
import uvloop
from redis.asyncio import Redis

from service.client import make_redis
from service.embedded import EmbeddedRedis
from service.errors import StorageUnavailable
from service.keys import Keys
from service.queue import StreamRecorder
from service.scriptline import ScriptLine, Unsupported
from tests.test_queue import letter, make_event


@pytest.fixture
async def recorder(redis: Redis) -> AsyncIterator[StreamRecorder]:
    made = StreamRecorder(redis, Keys())
    yield made
    await made.close()


def recorder_clients(sync_redis: redis_sync.Redis) -> list[dict[str, str]]:
    """The Redis connections that ran a script (the recorder's own lines; the test clients run none)."""
    return [c for c in sync_redis.client_list() if c.get("cmd") in ("evalsha", "script|load")]


async def test_records_on_connections_of_its_own(recorder: StreamRecorder, sync_redis: redis_sync.Redis) -> None:
    sync_redis.config_resetstat()
    results = await asyncio.gather(*(recorder.record([make_event(n)], [], "t") for n in range(50)))
    assert sum(r.accepted for r in results) == 50
    assert sync_redis.xlen("qbo:events") == 50
    assert 1 <= len(recorder_clients(sync_redis)) <= 2  # at most one connection per call in flight


async def test_a_flushed_script_is_loaded_again(recorder: StreamRecorder, sync_redis: redis_sync.Redis) -> None:
    await recorder.record([make_event(1)], [], "t")
    sync_redis.script_flush()
    result = await recorder.record([make_event(2)], [], "t")
    assert result.accepted == 1
    assert sync_redis.xlen("qbo:events") == 2


async def test_a_connection_closed_while_idle_is_made_again(
    recorder: StreamRecorder, sync_redis: redis_sync.Redis
) -> None:
    await recorder.record([make_event(1)], [], "t")
    for client in recorder_clients(sync_redis):
        sync_redis.client_kill_filter(_id=client["id"])
    await asyncio.sleep(0.05)  # the line sees its connection close
    result = await recorder.record([make_event(2)], [], "t")
    assert result.accepted == 1
    assert sync_redis.xlen("qbo:events") == 2


async def test_a_connection_lost_mid_call_fails_its_group_and_is_not_sent_again(
    recorder: StreamRecorder, sync_redis: redis_sync.Redis
) -> None:
    """Redis may have run the script before the connection went: sending it again would append its dead
    letters twice. The group gets StorageUnavailable (503); Intuit's retry goes through dedupe."""
    await recorder.record([make_event(1)], [], "t")
    sync_redis.client_pause(1000, all=False)  # the next call waits in Redis ...
    pending = asyncio.create_task(recorder.record([make_event(2)], [letter(2)], "t"))
    await asyncio.sleep(0.2)
    for client in recorder_clients(sync_redis):
        sync_redis.client_kill_filter(_id=client["id"])  # ... and its connection goes
    with pytest.raises(StorageUnavailable):
        await pending
    sync_redis.client_unpause()
    await asyncio.sleep(0.1)
    assert sync_redis.xlen("qbo:events:dead") <= 1  # at most the one run Redis may have made
    assert (await recorder.record([make_event(3)], [], "t")).accepted == 1


async def test_a_refused_call_is_storage_unavailable(recorder: StreamRecorder, sync_redis: redis_sync.Redis) -> None:
    sync_redis.set("qbo:events", "not a stream")  # XADD fails inside the script: WRONGTYPE
    with pytest.raises(StorageUnavailable, match="refused"):
        await recorder.record([make_event(1)], [], "t")
    sync_redis.delete("qbo:events", f"qbo:seen:{1:032x}")
    assert (await recorder.record([make_event(1)], [], "t")).accepted == 1  # the line itself is still good


async def test_unsupported_connections_fall_back_to_the_client(
    recorder: StreamRecorder, sync_redis: redis_sync.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_streams(self: ScriptLine) -> None:
        raise Unsupported("no streams here")

    monkeypatch.setattr(ScriptLine, "connect", no_streams)
    results = await asyncio.gather(*(recorder.record([make_event(n)], [], "t") for n in range(20)))
    assert sum(r.accepted for r in results) == 20
    assert (await recorder.record([make_event(1)], [], "t")).duplicates == 1
    assert sync_redis.xlen("qbo:events") == 20


async def test_a_restarted_redis_costs_no_request(own_redis: EmbeddedRedis) -> None:
    client = make_redis(own_redis.url, timeout=2.0)
    recorder = StreamRecorder(client, Keys())
    try:
        assert (await recorder.record([make_event(1)], [], "t")).accepted == 1
        await asyncio.to_thread(own_redis.kill)
        await asyncio.to_thread(own_redis.start)
        assert (await recorder.record([make_event(2)], [], "t")).accepted == 1  # the script is loaded again too
        await asyncio.to_thread(own_redis.kill)
        with pytest.raises(StorageUnavailable):
            await recorder.record([make_event(3)], [], "t")  # Redis down: refused, quickly
    finally:
        await recorder.close()
        await client.aclose()


async def test_a_stalled_redis_times_out(own_redis: EmbeddedRedis) -> None:
    client = make_redis(own_redis.url, timeout=2.0)
    recorder = StreamRecorder(client, Keys(), call_timeout_seconds=0.3)
    sync = redis_sync.Redis.from_url(own_redis.url)
    try:
        await recorder.record([make_event(1)], [], "t")
        sync.client_pause(2000, all=False)
        started = asyncio.get_running_loop().time()
        with pytest.raises(StorageUnavailable, match="timed out"):
            await recorder.record([make_event(2)], [], "t")
        assert asyncio.get_running_loop().time() - started < 1.5
        await asyncio.sleep(2.0)  # the paused call may still land later: that write is then a duplicate, never lost
        result = await recorder.record([make_event(2)], [], "t")
        assert result.accepted + result.duplicates == 1
        assert sync.xlen("qbo:events") == 2
    finally:
        sync.close()
        await recorder.close()
        await client.aclose()


def test_lines_are_used_under_uvloop(redis_url: str, sync_redis: redis_sync.Redis) -> None:
    """uvicorn runs the service on uvloop, whose transports are not ``asyncio.Transport``s: the lines must
    still take them over rather than fall back to the client."""

    async def record_some() -> tuple[int, bool]:
        client = make_redis(redis_url, timeout=2.0)
        recorder = StreamRecorder(client, Keys())
        try:
            results = await asyncio.gather(*(recorder.record([make_event(n)], [], "t") for n in range(10)))
            return sum(r.accepted for r in results), recorder._use_client
        finally:
            await recorder.close()
            await client.aclose()

    accepted, used_client = uvloop.run(record_some())
    assert accepted == 10
    assert used_client is False
    assert sync_redis.xlen("qbo:events") == 10
