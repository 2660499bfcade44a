"""The write side of the events stream (SPEC §5.2 to §5.4): dedupe marks, events and dead letters in one Lua call.

Concurrent requests are group-committed: while the script calls in flight wait on Redis, the requests that
arrive queue up and go together in the next call. Each request is answered only after the call carrying
its own write returned; a failed call fails every request in it. Calls go out on connections of the
recorder's own (``ScriptLine``) and are settled in the callback that reads their reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any

import hiredis
import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from service.errors import StorageUnavailable
from service.keys import Keys
from service.models import EVENT_FIELDS, DeadLetter, Event
from service.scriptline import Replies, ScriptLine, Unsupported

logger = logging.getLogger(__name__)

MAX_REQUESTS_PER_CALL = 256
# Events and dead letters per call (a single larger request still goes, alone): a call carries two arguments
# per event, and Redis 6.2 refuses a command of more than 1,048,576; Redis runs a call without pause.
MAX_ITEMS_PER_CALL = 100_000
# Script calls in flight at once. One more than one lets a group fill while the previous call waits on
# Redis (fsync with appendfsync always); more would only split groups.
MAX_CALLS_IN_FLIGHT = 2

# record.lua takes an event's payload (its last and largest value) as an argument of its own: not escaped
# into the JSON document nor decoded from it, which costs Redis about 1.5 µs per event less (bench/).
*_SHORT_FIELDS, _LAST_FIELD = EVENT_FIELDS
if _LAST_FIELD != "payload":  # the schema and record.lua must agree; checked even under python -O
    raise RuntimeError(f"record.lua expects the payload as the last event field, not {_LAST_FIELD!r}")


# Plain classes, not dataclasses: compiled (service/compiled.py), a dataclass's __init__ would still run as Python.
class RecordResult:
    """What one request's write did: events appended, events that were duplicates, dead letters appended."""

    __slots__ = ("accepted", "dead_lettered", "duplicates")

    def __init__(self, accepted: int = 0, duplicates: int = 0, dead_lettered: int = 0) -> None:
        self.accepted = accepted
        self.duplicates = duplicates
        self.dead_lettered = dead_lettered

    def __repr__(self) -> str:
        return f"RecordResult({self.accepted}, {self.duplicates}, {self.dead_lettered})"

    def _fields(self) -> tuple[int, int, int]:
        return (self.accepted, self.duplicates, self.dead_lettered)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordResult):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())


class _Request:
    __slots__ = ("done", "events", "letters", "received_at")

    def __init__(
        self,
        events: Sequence[Event],
        letters: Sequence[DeadLetter],
        received_at: str,
        done: asyncio.Future[RecordResult],
    ) -> None:
        self.events = events
        self.letters = letters
        self.received_at = received_at
        self.done = done


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
        # One connection of its own per call in flight; the idle ones wait here for the next group.
        self._lines = [ScriptLine(redis, timeout=call_timeout_seconds) for _ in range(MAX_CALLS_IN_FLIGHT)]
        self._idle_lines = list(self._lines)
        self._use_client = False  # set once this redis-py's connections turned out not to be usable as lines
        self._tasks: set[asyncio.Task[None]] = set()  # connecting lines; kept so they are not garbage-collected
        self._finished: asyncio.Future[None] | None = None  # what ``close`` waits on
        self._flush_scheduled = False
        self.dead_letter_cap_reached = 0

    async def record(self, events: Sequence[Event], letters: Sequence[DeadLetter], received_at: str) -> RecordResult:
        """Dedupe and append ``events``, append ``letters``; returns once Redis acknowledged the write."""
        if not events and not letters:
            return RecordResult()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[RecordResult] = loop.create_future()
        self.enqueue(events, letters, received_at, done)
        if not self._flush_scheduled:  # at the end of this turn, with whatever else it queued
            self._flush_scheduled = True
            loop.call_soon(self.flush)
        return await done

    def enqueue(
        self,
        events: Sequence[Event],
        letters: Sequence[DeadLetter],
        received_at: str,
        done: asyncio.Future[RecordResult],
    ) -> None:
        """``record`` without waiting: ``done`` gets the result (or ``StorageUnavailable``) once the write returned.

        Queued only: ``flush`` sends what is queued, so a caller with several requests queues them all first.
        """
        self._queue.append(_Request(events, letters, received_at, done))

    def flush(self) -> None:
        """Send the queued requests, in groups, on the lines not waiting on Redis (the others take the rest
        as soon as their call returns)."""
        self._flush_scheduled = False
        self._dispatch()

    async def preload(self) -> None:
        """Load the Lua script now, so the first request does not pay a NOSCRIPT round trip."""
        await self._redis.script_load(self._script.script)

    async def close(self) -> None:
        """Wait for the writes already queued, then close the recorder's connections."""
        self._dispatch()
        if self._queue or len(self._idle_lines) < len(self._lines):
            self._finished = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._finished)
        for line in self._lines:
            await line.close()

    def _dispatch(self) -> None:
        while self._queue and self._idle_lines:
            batch = self._next_group()
            line = self._idle_lines.pop()
            try:
                call = _Call(self, line, batch)
            except Exception as exc:  # not expected: the group fails (503, logged), the line takes the next one
                logger.exception("building a script call failed")
                self._idle_lines.append(line)
                failure = StorageUnavailable(f"recording failed: {type(exc).__name__}")
                for request in batch:
                    if not request.done.done():
                        request.done.set_exception(failure)
                continue
            call.start()

    def _next_group(self) -> list[_Request]:
        """The oldest queued requests, as many as fit in one call (at least one)."""
        count = items = 0
        for request in self._queue:
            size = len(request.events) + len(request.letters)
            if count == MAX_REQUESTS_PER_CALL or (count and items + size > MAX_ITEMS_PER_CALL):
                break
            count += 1
            items += size
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    def _finish(self, call: _Call, outcome: Replies | Exception) -> None:
        """Settle every request of ``call``, then give its line the next group."""
        if call.settled:
            return
        call.settled = True
        try:
            if isinstance(outcome, Exception):
                raise outcome
            results = self._results(call.batch, outcome)
        except Exception as exc:
            # Every request of the call fails: none is answered 200 without its own write.
            failure = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(repr(exc))
            for request in call.batch:
                if not request.done.done():
                    request.done.set_exception(failure)
        else:
            for request, result in zip(call.batch, results, strict=True):
                if not request.done.done():
                    request.done.set_result(result)
        self._idle_lines.append(call.line)
        self._dispatch()
        finished = self._finished
        if finished is not None and not finished.done() and len(self._idle_lines) == len(self._lines):
            finished.set_result(None)

    def _command(self, batch: list[_Request]) -> tuple[list[str], list[str | bytes]]:
        """KEYS and ARGV of one ``record.lua`` call for ``batch``."""
        keys = [self._keys.events, self._keys.dead_letters]
        seen = self._keys.seen
        events: list[list[str]] = []
        payloads: list[str | bytes] = []
        letters: list[list[str]] = []
        for request in batch:
            for event in request.events:
                keys.append(seen(event.event_id))
                values = event.stream_values(request.received_at)
                payloads.append(values.pop())  # the last field, an argument of its own
                events.append(values)
            for letter in request.letters:
                letters.append([part for item in letter.stream_fields(request.received_at).items() for part in item])
        document = orjson.dumps({"names": _SHORT_FIELDS, "events": events, "letters": letters})
        return keys, [self._ttl, str(self._dead_maxlen), document, _LAST_FIELD, *payloads]

    def _results(self, batch: list[_Request], replies: Replies) -> list[RecordResult]:
        """Each request's counts from the script's reply; raises ``StorageUnavailable`` for a refused call."""
        reply = replies[0]
        if isinstance(reply, hiredis.ReplyError | Exception):
            raise StorageUnavailable(f"recording refused by Redis: {str(reply)[:200]}")
        if self._min_replicas > 0:
            replicas = replies[1]
            if isinstance(replicas, hiredis.ReplyError) or int(replicas) < self._min_replicas:
                raise StorageUnavailable(f"write reached {replicas} of {self._min_replicas} required replicas")
        statuses, dead_len = reply[:-1], int(reply[-1])
        if dead_len >= self._dead_maxlen:
            self.dead_letter_cap_reached += 1
            logger.warning("dead-letter stream is at its cap (%d entries); oldest letters are trimmed", dead_len)
        results = []
        position = 0
        for request in batch:
            mine = statuses[position : position + len(request.events)]
            position += len(request.events)
            appended = mine.count(1)  # integer replies
            results.append(RecordResult(appended, len(mine) - appended, len(request.letters)))
        return results

    async def _call_with_client(self, keys: list[str], args: list[str | bytes]) -> Replies:
        """The same call through redis-py's client: for a redis-py whose connections cannot be lines."""
        try:
            if self._min_replicas <= 0:
                return [await self._script(keys=keys, args=args)]
            # WAIT covers the writes of its own connection, so the script and WAIT share one pipeline.
            for attempt in (1, 2):
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                        pipe.wait(self._min_replicas, self._replica_timeout_ms)
                        return list(await pipe.execute())
                except NoScriptError:
                    if attempt == 2:
                        raise
                    await self._redis.script_load(self._script.script)
        except RedisError as exc:
            raise StorageUnavailable(f"recording failed: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")


class _Call:
    """One script call for a group of requests, on one line: connect if need be, send, read, settle.

    A lost script (Redis restarted, ``SCRIPT FLUSH``) is loaded and the call sent again: nothing ran. A lost
    connection fails the group; a line whose connection closed while idle makes a new one before sending.
    """

    def __init__(self, recorder: StreamRecorder, line: ScriptLine, batch: list[_Request]) -> None:
        self.recorder = recorder
        self.line = line
        self.batch = batch
        self.keys, self.args = recorder._command(batch)
        script = recorder._script.sha
        self.commands: list[tuple[Any, ...]] = [("EVALSHA", script, len(self.keys), *self.keys, *self.args)]
        if recorder._min_replicas > 0:
            # WAIT covers the writes of its own connection, so it follows the script on the same one.
            self.commands.append(("WAIT", recorder._min_replicas, recorder._replica_timeout_ms))
        self.reloaded = False
        self.settled = False

    def start(self) -> None:
        if self.line.connected and not self.recorder._use_client:
            try:
                self.line.send(self.commands, self._on_reply)
            except Exception as exc:  # not expected (a closed connection reports through its callback)
                self.recorder._finish(self, exc)
            return
        task = asyncio.get_running_loop().create_task(self._connect_and_send())
        self.recorder._tasks.add(task)
        task.add_done_callback(self.recorder._tasks.discard)

    async def _connect_and_send(self) -> None:
        recorder = self.recorder
        try:
            if not recorder._use_client:
                try:
                    await self.line.connect()
                except Unsupported as unsupported:  # a name of its own: compiled, a name has one type
                    logger.warning("recording through the client instead of connections of its own: %s", unsupported)
                    recorder._use_client = True
            if recorder._use_client:
                recorder._finish(self, await recorder._call_with_client(self.keys, self.args))
                return
        except Exception as exc:
            recorder._finish(self, exc)
            return
        except BaseException:  # cancelled (shutdown): the group is failed, not left waiting
            recorder._finish(self, StorageUnavailable("recording cancelled"))
            raise
        self.start()

    def _on_reply(self, replies: Replies | StorageUnavailable) -> None:
        try:
            if isinstance(replies, StorageUnavailable):
                # Never sent again: Redis may have run the script before the connection went (a second run would
                # append its dead letters twice and report its events as duplicates). The group gets 503s and
                # Intuit's retry goes through dedupe; the next call makes a new connection.
                self.recorder._finish(self, replies)
            elif _is_noscript(replies[0]) and not self.reloaded:  # nothing ran: load the script, call again
                self.reloaded = True
                load: tuple[Any, ...] = ("SCRIPT", "LOAD", self.recorder._script.script)
                self.line.send([load, *self.commands], self._after_load)
            else:
                self.recorder._finish(self, replies)
        except Exception as exc:  # never let a failure escape into the connection's callback
            self.recorder._finish(self, exc)

    def _after_load(self, replies: Replies | StorageUnavailable) -> None:
        self._on_reply(replies if isinstance(replies, StorageUnavailable) else replies[1:])


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")
