"""Redis client construction and the start-up durability check (SPEC §5.6)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.client import NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import ConfigurationError

logger = logging.getLogger(__name__)


def make_redis(url: str, *, timeout: float = 2.0, max_connections: int = 64) -> Redis:
    """An async client with string replies, bounded timeouts, and one quick retry so a restarted
    Redis is reconnected to by the next request instead of failing it.

    The pool does not block (a blocking pool costs a timer per command); callers that may burst bound
    their own concurrency well below ``max_connections`` (see ``ConnectionStore``).
    """
    pool = ConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections,
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


def durability_problems(config: dict[str, str]) -> list[str]:
    """What in Redis's configuration lets an acknowledged write be lost."""
    problems = []
    if config.get("appendonly", "no") != "yes":
        problems.append("appendonly is off: a crash loses writes since the last snapshot")
    elif config.get("appendfsync", "everysec") != "always":
        problems.append(f"appendfsync is {config.get('appendfsync')!r}, not 'always': a crash can lose up to ~1 s")
    if config.get("maxmemory-policy", "noeviction") != "noeviction":
        problems.append(f"maxmemory-policy is {config.get('maxmemory-policy')!r}: Redis may evict queued events")
    return problems


async def check_durability(redis: Redis, *, require: bool) -> list[str]:
    """Warn about (or, with ``require``, refuse) a Redis that can lose acknowledged writes."""
    config: dict[str, str] = {}
    try:
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            config.update(await redis.config_get(name))  # type: ignore[arg-type]
    except ResponseError as exc:
        message = f"cannot read Redis configuration (CONFIG GET refused: {exc}); durability unchecked"
        if require:
            raise ConfigurationError(f"QBO_REQUIRE_DURABLE is set but {message}") from None
        logger.warning(message)
        return [message]
    except RedisError as exc:
        if require:
            raise ConfigurationError(f"QBO_REQUIRE_DURABLE is set but Redis is unreachable: {exc}") from None
        logger.warning("Redis is unreachable at start-up (%s); /readyz answers 503 until it is back", exc)
        return []
    problems = durability_problems(config)
    for problem in problems:
        logger.warning("Redis durability: %s", problem)
    if problems and require:
        raise ConfigurationError("QBO_REQUIRE_DURABLE is set and Redis is not durable: " + "; ".join(problems))
    return problems


async def scan_keys(
    redis: Redis, pattern: str, count: int = 500, *, skipped: list[bytes] | None = None
) -> AsyncIterator[str]:
    """The names of the keys matching ``pattern``; one that is not UTF-8 (another writer's) is skipped, logged and
    added to ``skipped``, so it cannot stop a scan over every tenant."""
    async for raw in redis.scan_iter(pattern, count, **{NEVER_DECODE: True}):  # type: ignore[arg-type]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.error("skipped a key matching %s whose name is not UTF-8: %r", pattern, raw[:80])
            if skipped is not None:
                skipped.append(raw)


async def text_hash(redis: Redis, key: str) -> tuple[dict[str, str], dict[bytes, bytes]]:
    """A hash's entries as text, and apart, as bytes, the entries whose name or value is not UTF-8 (logged by name).

    Read as bytes and decoded entry by entry: one entry another writer garbled costs only itself. ``redis`` may be
    a pipeline under WATCH."""
    raw: dict[bytes, bytes] = await redis.execute_command("HGETALL", key, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
    entries: dict[str, str] = {}
    unreadable: dict[bytes, bytes] = {}
    for name, value in raw.items():
        try:
            entries[name.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            unreadable[name] = value
    if unreadable:
        names = ", ".join(repr(name)[:80] for name in unreadable)  # names only: a value may be a secret
        logger.error("%s: entries that are not UTF-8 text skipped: %s", key, names[:400])
    return entries, unreadable
