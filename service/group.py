"""One consumer's handle on a Redis consumer group of the events stream: the commands the consumer library sends.

The delivery policy (retries, dead-lettering, concurrency, stopping) is ``consumer.py``'s; this module only
talks to Redis, through ``lua/claim.lua`` and ``lua/dead_letter.lua`` where a step must be atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.deadletters import handler_failed_letter
from service.keys import Keys

logger = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str], int]  # entry id, fields, how many times the group has delivered it


def group_is_gone(exc: ResponseError) -> bool:
    """NOGROUP: the group (or the stream with it) was deleted; UNBLOCKED: a blocked read saw that happen."""
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


class StreamGroup:
    """Consumer ``consumer`` of group ``group`` on the events stream."""

    def __init__(
        self, redis: Redis, keys: Keys, group: str, consumer: str, *, dead_letter_maxlen: int = 1_000_000
    ) -> None:
        self.group = group
        self.consumer = consumer
        self._redis = redis
        self._keys = keys
        self._dead_maxlen = str(dead_letter_maxlen)
        self._claim = redis.register_script(_lua("claim.lua"))
        self._dead_letter = redis.register_script(_lua("dead_letter.lua"))
        self._cursor = "0-0"

    async def ensure(self, start: str) -> None:
        """Create the group at ``start`` (and the stream) if missing; only "group already exists" is benign."""
        try:
            await self._redis.xgroup_create(self._keys.events, self.group, start, mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        else:
            logger.info("created consumer group %s on %s at %s", self.group, self._keys.events, start)

    async def claim(self, count: int, min_idle_ms: int) -> tuple[list[Entry], bool]:
        """Claim up to ``count`` entries pending longer than ``min_idle_ms``; raises their delivery counts.

        Returns the entries and whether the scan of the pending list is complete (else call again).
        """
        args = [self.group, self.consumer, str(min_idle_ms), self._cursor, str(count)]
        cursor, claimed, deleted = await self._claim(keys=[self._keys.events], args=args)
        self._cursor = cursor
        if deleted:
            logger.warning("acknowledged %d pending entries that no longer exist in the stream", deleted)
        entries = [(entry_id, _pairs(flat), int(count)) for entry_id, count, flat in claimed]
        return entries, cursor == "0-0"

    async def read(self, count: int, block_ms: int, stop: asyncio.Event) -> list[Entry]:
        """New entries (waiting up to ``block_ms``); abandons the read and returns [] as soon as ``stop`` is set."""
        read = asyncio.ensure_future(
            self._redis.xreadgroup(self.group, self.consumer, {self._keys.events: ">"}, count=count, block=block_ms)
        )
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({read, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if not read.done():
            # Cancelling closes the connection, so the server drops the blocked read; anything handed out
            # in that instant stays pending and is reclaimed later.
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read
            return []
        reply: Any = read.result() or []
        streams = reply.items() if isinstance(reply, dict) else reply  # RESP3 answers a map
        return [(entry_id, fields, 1) for _, batch in streams for entry_id, fields in batch if entry_id is not None]

    async def ack(self, entry_id: str) -> bool:
        """Acknowledge; False when the entry was not pending (acknowledged already, or the group was reset)."""
        return bool(await self._redis.xack(self._keys.events, self.group, entry_id))

    async def dead_letter(self, entry_id: str, fields: Mapping[str, str], *, error: str, detail: str) -> str | None:
        """Move the entry to the dead-letter stream and acknowledge it, atomically; ``None`` (nothing done)
        when it is no longer pending for this consumer."""
        letter = handler_failed_letter(entry_id, fields, error=error, detail=detail)
        args = [self.group, self.consumer, entry_id, self._dead_maxlen]
        for name, value in letter.items():
            args += [name, value]
        letter_id = await self._dead_letter(keys=[self._keys.events, self._keys.dead_letters], args=args)
        return str(letter_id) if letter_id else None

    async def release(self, entry_ids: list[Any], idle_ms: int) -> None:
        """Make entries read but never handed out claimable at once (JUSTID: delivery counts are not raised)."""
        if entry_ids:
            with contextlib.suppress(Exception):
                await self._redis.xclaim(
                    self._keys.events, self.group, self.consumer, 0, entry_ids, idle=idle_ms, justid=True
                )


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _lua(name: str) -> str:
    return resources.files("service").joinpath("lua", name).read_text(encoding="utf-8")
