"""Operator views of the events stream (SPEC §5.5): stats, and trimming what every group has acknowledged."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.deadletters import DeadLetters
from service.keys import Keys

_PAGE = 10_000


@dataclass(frozen=True, slots=True)
class TrimResult:
    removed: int
    min_id: str  # entries before this id were removed; "" when nothing was trimmed (no stream, no group)


class StreamAdmin:
    """Read-mostly operations on the events stream for the CLI (and anyone else)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._trim = redis.register_script(resources.files("service").joinpath("lua", "trim.lua").read_text())

    async def stats(self, now: float | None = None) -> dict[str, Any]:
        """Stream length, each group's consumers, pending count, lag and oldest pending entry, dead letters by reason.

        Ages are seconds since the entry was appended (stream ids carry the time); ``lag`` is the number of
        entries not yet delivered to the group (from Redis 7's XINFO, else counted).
        """
        now_ms = int((time.time() if now is None else now) * 1000)
        stream = self._keys.events
        length = int(await self._redis.xlen(stream))
        groups: list[dict[str, Any]] = []
        if length or await self._redis.exists(stream):
            infos: list[dict[str, Any]] = await self._redis.xinfo_groups(stream)
            for info in infos:
                groups.append(await self._group(info, now_ms))
        oldest = [g["oldest_pending_age_seconds"] for g in groups if g["oldest_pending_age_seconds"] is not None]
        counts = await DeadLetters(self._redis, self._keys).counts()
        return {
            "stream": stream,
            "length": length,
            "groups": groups,
            "oldest_pending_age_seconds": max(oldest) if oldest else None,
            "dead_letters": {"stream": self._keys.dead_letters, "total": sum(counts.values()), "by_reason": counts},
        }

    async def _group(self, info: dict[str, Any], now_ms: int) -> dict[str, Any]:
        name = str(info["name"])
        last = str(info["last-delivered-id"])
        summary: dict[str, Any] = await self._redis.xpending(self._keys.events, name)
        pending = int(summary["pending"])
        oldest_id = summary["min"] if pending else None
        lag = info.get("lag")
        return {
            "name": name,
            "consumers": int(info["consumers"]),
            "pending": pending,
            "last_delivered_id": last,
            "lag": int(lag) if lag is not None else await self._count_after(last),
            "oldest_pending_id": oldest_id,
            "oldest_pending_age_seconds": _age(oldest_id, now_ms) if oldest_id else None,
        }

    async def _count_after(self, entry_id: str) -> int:
        count = 0
        start = "(" + entry_id
        while True:
            page: Any = await self._redis.xrange(self._keys.events, start, "+", count=_PAGE)
            count += len(page)
            if len(page) < _PAGE:
                return count
            start = "(" + page[-1][0]

    async def trim(self) -> TrimResult:
        """Remove the entries every group has acknowledged; nothing when the stream has no group (one Lua call)."""
        removed, min_id = await self._trim(keys=[self._keys.events])
        return TrimResult(int(removed), str(min_id))

    async def delete_group(self, group: str) -> bool:
        """Remove a consumer group (its pending entries stop blocking ``trim``); True if it existed."""
        try:
            return bool(await self._redis.xgroup_destroy(self._keys.events, group))
        except ResponseError as exc:
            if "no such key" in str(exc).lower():  # no stream, so no group either
                return False
            raise


def _age(entry_id: str, now_ms: int) -> float:
    return max(0, now_ms - int(entry_id.split("-", 1)[0])) / 1000
