"""The write side of the events stream (SPEC §5.2 to §5.4): dedupe marks, events and dead letters in one Lua call.

Concurrent requests are group-committed: while one script call is in flight, the requests that arrive
queue up and go together in the next call. Each request is answered only after the call carrying its
own write returned; a failed call fails every request in it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from service.errors import StorageUnavailable
from service.keys import Keys
from service.models import EVENT_FIELDS, DeadLetter, Event
from service.scriptline import ScriptLine, Unsupported

logger = logging.getLogger(__name__)

MAX_REQUESTS_PER_CALL = 256
# Script calls in flight at once. One more than one lets a group fill while the previous call waits on
# Redis (fsync with appendfsync always); more would only split groups.
MAX_CALLS_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class RecordResult:
    accepted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0


@dataclass(slots=True)
class _Request:
    events: Sequence[Event]
    letters: Sequence[DeadLetter]
    received_at: str
    done: asyncio.Future[RecordResult]


class StreamRecorder:
    """Records the outcome of webhook requests in Redis; one round trip per group of concurrent requests."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        dedupe_ttl_seconds: int = 7 * 24 * 3600,
        dead_letter_maxlen: int = 1_000_000,
        min_replicas: int = 0,
        replica_timeout_seconds: float = 1.0,
        call_timeout_seconds: float = 2.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = str(dedupe_ttl_seconds)
        self._dead_maxlen = dead_letter_maxlen
        self._min_replicas = min_replicas
        self._replica_timeout_ms = max(1, int(replica_timeout_seconds * 1000))
        self._script = redis.register_script(resources.files("service").joinpath("lua", "record.lua").read_text())
        self._queue: list[_Request] = []
        self._writers: set[asyncio.Task[None]] = set()  # kept so the tasks are not garbage-collected
        self._writing = 0
        # One connection of its own per call in flight; None once this redis-py turned out not to support it.
        self._lines: list[ScriptLine] | None = [
            ScriptLine(redis, timeout=call_timeout_seconds) for _ in range(MAX_CALLS_IN_FLIGHT)
        ]
        self._free_lines = list(self._lines)
        self.dead_letter_cap_reached = 0

    async def record(self, events: Sequence[Event], letters: Sequence[DeadLetter], received_at: str) -> RecordResult:
        """Dedupe and append ``events``, append ``letters``; returns once Redis acknowledged the write."""
        if not events and not letters:
            return RecordResult()
        done: asyncio.Future[RecordResult] = asyncio.get_running_loop().create_future()
        self.enqueue(events, letters, received_at, done)
        return await done

    def enqueue(
        self,
        events: Sequence[Event],
        letters: Sequence[DeadLetter],
        received_at: str,
        done: asyncio.Future[RecordResult],
    ) -> None:
        """``record`` without waiting: ``done`` gets the result (or ``StorageUnavailable``) once the write returned."""
        self._queue.append(_Request(events, letters, received_at, done))
        if self._writing < MAX_CALLS_IN_FLIGHT:
            self._writing += 1  # counted here and uncounted by the writer itself, never by a callback later
            writer = asyncio.get_running_loop().create_task(self._drain())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)

    async def preload(self) -> None:
        """Load the Lua script now, so the first request does not pay a NOSCRIPT round trip."""
        await self._redis.script_load(self._script.script)

    async def close(self) -> None:
        """Wait for the writes already queued, then close the recorder's connections."""
        if self._writers:
            await asyncio.shield(asyncio.gather(*self._writers))
        for line in self._lines or ():
            await line.close()

    async def _drain(self) -> None:
        line = self._free_lines.pop() if self._free_lines else None
        try:
            await self._drain_queue(line)
        finally:
            if line is not None:
                self._free_lines.append(line)
            self._writing -= 1

    async def _drain_queue(self, line: ScriptLine | None) -> None:
        while self._queue:
            batch = self._queue[:MAX_REQUESTS_PER_CALL]
            del self._queue[:MAX_REQUESTS_PER_CALL]
            try:
                results = await self._write(batch, line)
            except Exception as exc:
                # Every request of the call fails: none is answered 200 without its own write.
                failure = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(repr(exc))
                for request in batch:
                    if not request.done.done():
                        request.done.set_exception(failure)
                continue
            for request, result in zip(batch, results, strict=True):
                if not request.done.done():
                    request.done.set_result(result)

    async def _write(self, batch: list[_Request], line: ScriptLine | None) -> list[RecordResult]:
        keys = [self._keys.events, self._keys.dead_letters]
        seen = self._keys.seen
        events: list[list[str]] = []
        letters: list[list[str]] = []
        for request in batch:
            for event in request.events:
                keys.append(seen(event.event_id))
                events.append(event.stream_values(request.received_at))
            for letter in request.letters:
                letters.append([part for item in letter.stream_fields(request.received_at).items() for part in item])
        document = orjson.dumps({"names": EVENT_FIELDS, "events": events, "letters": letters})
        args: list[str | bytes] = [self._ttl, str(self._dead_maxlen), document]
        try:
            reply = await self._call_on(line, keys, args) if line is not None and self._lines else None
            if reply is None:
                reply = await self._call(keys, args)
        except RedisError as exc:
            raise StorageUnavailable(f"recording failed: {type(exc).__name__}: {exc}") from exc
        statuses, dead_len = reply[:-1], int(reply[-1])
        if dead_len >= self._dead_maxlen:
            self.dead_letter_cap_reached += 1
            logger.warning("dead-letter stream is at its cap (%d entries); oldest letters are trimmed", dead_len)
        results = []
        position = 0
        for request in batch:
            mine = statuses[position : position + len(request.events)]
            position += len(request.events)
            appended = sum(1 for status in mine if int(status) == 1)
            results.append(RecordResult(appended, len(mine) - appended, len(request.letters)))
        return results

    async def _call_on(self, line: ScriptLine, keys: list[str], args: list[str | bytes]) -> list[int] | None:
        """The script call (and WAIT) on the recorder's own connection; ``None`` when that is unsupported."""
        commands: list[tuple[Any, ...]] = [("EVALSHA", self._script.sha, len(keys), *keys, *args)]
        if self._min_replicas > 0:
            # WAIT covers the writes of its own connection, so it follows the script on the same one.
            commands.append(("WAIT", self._min_replicas, self._replica_timeout_ms))
        try:
            replies = await line.exchange(commands)
            if _is_noscript(replies[0]):  # Redis restarted or SCRIPT FLUSH: nothing ran; load and call again
                replies = (await line.exchange([("SCRIPT", "LOAD", self._script.script), *commands]))[1:]
        except Unsupported as exc:
            logger.warning("recording through the client instead of a connection of its own: %s", exc)
            self._lines = None
            return None
        reply = replies[0]
        if isinstance(reply, hiredis.ReplyError):
            raise StorageUnavailable(f"recording refused by Redis: {str(reply)[:200]}")
        if self._min_replicas > 0:
            replicas = replies[1]
            if isinstance(replicas, hiredis.ReplyError) or int(replicas) < self._min_replicas:
                raise StorageUnavailable(f"write reached {replicas} of {self._min_replicas} required replicas")
        return reply  # type: ignore[no-any-return]

    async def _call(self, keys: list[str], args: list[str | bytes]) -> list[int]:
        if self._min_replicas <= 0:
            return await self._script(keys=keys, args=args)  # type: ignore[no-any-return]
        # WAIT covers the writes of its own connection, so the script and WAIT share one pipeline.
        for attempt in (1, 2):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                    pipe.wait(self._min_replicas, self._replica_timeout_ms)
                    reply, replicas = await pipe.execute()
            except NoScriptError:
                if attempt == 2:
                    raise
                await self._redis.script_load(self._script.script)
                continue
            if int(replicas) < self._min_replicas:
                raise StorageUnavailable(f"write reached {replicas} of {self._min_replicas} required replicas")
            return reply  # type: ignore[no-any-return]
        raise AssertionError("unreachable")


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")
