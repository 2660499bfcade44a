"""The consumer library (SPEC §5.5): read ``qbo:events`` through a Redis consumer group, at least once.

Two styles over one engine. Iterate, acknowledging each event once it is processed::

    async with Consumer(redis, group="billing", consumer="worker-1") as consumer:
        async for event in consumer:
            print(event.realm_id, event.entity, event.entity_id, event.operation)
            await event.ack()

or hand a function to ``run`` (acknowledged when it returns, retried when it raises)::

    await run(handle, redis=redis, group="billing", concurrency=8, stop=stop_event)

The group is created (``XGROUP CREATE ... MKSTREAM``) at ``0`` unless told ``start="$"``, and re-created
at ``0`` if the group or the stream is deleted while consuming (duplicates are acceptable, loss is not).
Entries left pending longer than ``claim_idle`` seconds (a dead consumer's, or a failed delivery's) are
reclaimed and delivered again; an entry whose handler failed on its ``max_deliveries``-th delivery is
moved to the dead-letter stream (reason ``handler_failed``) and acknowledged in one atomic step.
``claim_idle`` must exceed the longest time a handler runs, or a slow entry is delivered twice.

The library installs no signal handlers: call ``Consumer.stop()`` (or set ``run``'s ``stop`` event) from
yours. Stopping reads nothing new and lets in-flight handlers finish within ``drain_timeout``.
Importable without Starlette. The Redis client must be created with ``decode_responses=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.entries import SchemaError, StreamEvent
from service.group import Entry, StreamGroup, group_is_gone
from service.keys import Keys

logger = logging.getLogger(__name__)

Handler = Callable[[StreamEvent], Any]


class Consumer:
    """One consumer of a consumer group on the events stream; an async context manager and async iterator.

    ``redis``: an asyncio client with ``decode_responses=True`` whose socket timeout exceeds ``block``.
    ``group``/``consumer``: the group and this consumer's name (default ``<host>-<pid>``).
    ``prefix``: the key prefix (``QBO_KEY_PREFIX``). ``start``: where a new group starts, ``"0"`` or ``"$"``.
    ``claim_idle``: seconds an entry stays pending before it is reclaimed. ``max_deliveries``: deliveries
    before a failing entry is dead-lettered. ``batch_size``: entries read per call when iterating.
    ``block``: seconds one read waits for new entries. ``dead_letter_maxlen``: the dead-letter stream's cap.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        group: str,
        consumer: str | None = None,
        prefix: str = "qbo",
        start: str = "0",
        claim_idle: float = 60.0,
        max_deliveries: int = 5,
        batch_size: int = 16,
        block: float = 1.0,
        dead_letter_maxlen: int = 1_000_000,
    ) -> None:
        if not redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("Consumer needs a Redis client created with decode_responses=True")
        if max_deliveries < 1 or claim_idle <= 0 or batch_size < 1 or block <= 0:
            raise ValueError("max_deliveries and batch_size must be >= 1; claim_idle and block must be > 0")
        self.group = group
        self.name = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.max_deliveries = max_deliveries
        self.claim_idle = claim_idle
        self._stream = StreamGroup(redis, Keys(prefix), group, self.name, dead_letter_maxlen=dead_letter_maxlen)
        self._start = start
        self._batch_size = batch_size
        self._block_ms = max(1, int(block * 1000))
        self._idle_ms = max(1, int(claim_idle * 1000))
        self._buffer: deque[Entry] = deque()
        self._in_flight: set[str] = set()
        self._current: str | None = None
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        self._claim_interval = max(0.01, min(claim_idle / 2, 5.0))

    async def __aenter__(self) -> Consumer:
        await self.ensure_group()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def ensure_group(self, start: str | None = None) -> None:
        """Create the group (and the stream) if missing; an existing group is left as it is."""
        await self._stream.ensure(start or self._start)

    def stop(self) -> None:
        """Ask the consumer to stop: nothing new is read; iteration ends; ``process`` drains and returns."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def close(self) -> None:
        """Stop, and hand entries read but never delivered back to the group (claimable at once by others)."""
        self.stop()
        ids = [entry_id for entry_id, _, _ in self._buffer]
        self._buffer.clear()
        await self._stream.release(ids, self._idle_ms)

    # -- iterator style -------------------------------------------------------------------------------

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._current is not None:
            self._in_flight.discard(self._current)
            self._current = None
        while not self.stopping:
            while self._buffer and not self.stopping:
                event = await self._deliverable(self._buffer.popleft())
                if event is not None:
                    self._current = event.entry_id
                    self._in_flight.add(event.entry_id)
                    return event
            if not self.stopping:
                self._buffer.extend(await self._fetch(self._batch_size))
        raise StopAsyncIteration

    # -- handler style --------------------------------------------------------------------------------

    async def process(self, handler: Handler, *, concurrency: int = 1, drain_timeout: float = 30.0) -> None:
        """Run ``handler`` on every event until ``stop()``; at most ``concurrency`` at a time.

        A coroutine function is awaited; a plain function runs in a worker thread. The entry is
        acknowledged when the handler returns; when it raises, the entry stays pending (retried after
        ``claim_idle``) or, on its ``max_deliveries``-th delivery, is dead-lettered. On stop, handlers
        still running after ``drain_timeout`` seconds are cancelled and their entries left pending.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        tasks: set[asyncio.Task[None]] = set()
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self.stopping:
                if len(tasks) >= concurrency:
                    await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for entry in await self._fetch(concurrency - len(tasks)):
                    if self.stopping:
                        await self._stream.release([entry[0]], self._idle_ms)
                        continue
                    event = await self._deliverable(entry)
                    if event is None:
                        continue
                    self._in_flight.add(event.entry_id)
                    task = asyncio.create_task(self._handle(handler, event))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            stop_wait.cancel()
            await self._drain(tasks, drain_timeout)

    async def _drain(self, tasks: set[asyncio.Task[None]], seconds: float) -> None:
        if not tasks:
            return
        logger.info("draining %d in-flight handler(s) (up to %.1fs)", len(tasks), seconds)
        _, pending = await asyncio.wait(set(tasks), timeout=seconds)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("%d handler(s) did not finish within the drain timeout; left pending", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, handler: Handler, event: StreamEvent) -> None:
        try:
            try:
                if inspect.iscoroutinefunction(handler):
                    await handler(event)
                else:
                    result = await asyncio.to_thread(handler, event)
                    if inspect.isawaitable(result):
                        await result
            except Exception as exc:
                await self._failed(event.entry_id, event.fields, event.deliveries, exc)
                return
            finally:
                self._in_flight.discard(event.entry_id)
            await self._ack(event.entry_id)
        except RedisError as exc:
            # The entry stays pending and is delivered again after claim_idle.
            logger.error("Redis failed after handling entry %s: %s", event.entry_id, type(exc).__name__)

    # -- delivery policy ------------------------------------------------------------------------------

    async def _fetch(self, count: int) -> list[Entry]:
        """Reclaimed entries if any are due, else new ones (waiting up to ``block``); [] on stop or recovery."""
        try:
            loop = asyncio.get_running_loop()
            if loop.time() >= self._next_claim:
                claimed, complete = await self._stream.claim(count, self._idle_ms)
                if complete:
                    self._next_claim = loop.time() + self._claim_interval
                # An entry still being handled here went idle because its handler is slow: not a second copy.
                claimed = [entry for entry in claimed if entry[0] not in self._in_flight]
                if claimed:
                    logger.info("reclaimed %d entries idle for more than %.1fs", len(claimed), self.claim_idle)
                    return claimed
            return await self._stream.read(count, self._block_ms, self._stopping)
        except ResponseError as exc:
            if not group_is_gone(exc):
                raise
            logger.warning("group %s or its stream is gone; re-creating it at 0", self.group)
            await self.ensure_group("0")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("Redis unavailable while consuming (%s); retrying", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
        return []

    async def _deliverable(self, entry: Entry) -> StreamEvent | None:
        """The entry as an event to hand out, or ``None`` when it was dead-lettered or is not understood."""
        entry_id, fields, deliveries = entry
        if deliveries > self.max_deliveries:
            error = f"DeliveryLimitExceeded: delivered {deliveries - 1} times without being acknowledged"
            await self._dead_letter(entry_id, fields, error, f"not acknowledged after {deliveries - 1} deliveries")
            return None
        try:
            return StreamEvent.from_entry(
                entry_id,
                fields,
                deliveries=deliveries,
                ack=functools.partial(self._ack, entry_id),
                fail=functools.partial(self._failed, entry_id, fields, deliveries),
            )
        except SchemaError as exc:
            await self._failed(entry_id, fields, deliveries, exc)
            return None

    async def _ack(self, entry_id: str) -> None:
        if not await self._stream.ack(entry_id):
            logger.info("entry %s was no longer pending (reclaimed, or the group was reset)", entry_id)

    async def _failed(self, entry_id: str, fields: Mapping[str, str], deliveries: int, error: BaseException) -> None:
        if deliveries >= self.max_deliveries:
            detail = f"handler failed on delivery {deliveries} of {self.max_deliveries}"
            await self._dead_letter(entry_id, fields, f"{type(error).__name__}: {error}", detail)
            return
        logger.warning(
            "handler failed on entry %s (delivery %d of %d): %s; retried after %.1fs",
            entry_id,
            deliveries,
            self.max_deliveries,
            type(error).__name__,
            self.claim_idle,
        )

    async def _dead_letter(self, entry_id: str, fields: Mapping[str, str], error: str, detail: str) -> None:
        try:
            letter_id = await self._stream.dead_letter(entry_id, fields, error=error, detail=detail)
        except ResponseError as exc:
            if not group_is_gone(exc):
                raise
            await self.ensure_group("0")  # the new group delivers the entry again
            return
        if letter_id:
            logger.error("entry %s dead-lettered as %s (handler_failed): %s", entry_id, letter_id, detail)
        else:
            logger.info("entry %s is no longer pending for %s; not dead-lettered here", entry_id, self.name)


async def run(
    handler: Handler,
    *,
    redis: Redis,
    group: str,
    consumer: str | None = None,
    prefix: str = "qbo",
    start: str = "0",
    concurrency: int = 1,
    claim_idle: float = 60.0,
    max_deliveries: int = 5,
    block: float = 1.0,
    drain_timeout: float = 30.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Consume the events stream with ``handler`` until ``stop`` is set (or forever); see ``Consumer``.

    ``handler`` takes a ``StreamEvent``; the entry is acknowledged when it returns. Setting ``stop``
    reads nothing new and waits up to ``drain_timeout`` seconds for running handlers.
    """
    async with Consumer(
        redis,
        group=group,
        consumer=consumer,
        prefix=prefix,
        start=start,
        claim_idle=claim_idle,
        max_deliveries=max_deliveries,
        block=block,
    ) as worker:
        watcher = asyncio.ensure_future(_stop_on(stop, worker)) if stop is not None else None
        try:
            await worker.process(handler, concurrency=concurrency, drain_timeout=drain_timeout)
        finally:
            if watcher is not None:
                watcher.cancel()


async def _stop_on(event: asyncio.Event, worker: Consumer) -> None:
    await event.wait()
    worker.stop()


__all__ = ["Consumer", "Handler", "StreamEvent", "run"]
