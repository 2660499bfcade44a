"""A dedicated Redis connection for the recorder's script calls, with hiredis packing and parsing.

redis-py's per-command machinery (pool checkout, retry wrapper, observability hooks, a timer per read)
costs the client several times what packing a call and parsing its reply do: about 150 µs of CPU per
group-commit call, the single largest share of the receiver's own work per request after parsing
(measured with ``bench/``). The line keeps redis-py for everything a connection needs to be made
(address, TLS, AUTH, HELLO, SELECT: whatever the URL says) and only then writes packed commands to
the connection's stream and feeds the replies to its own ``hiredis.Reader``.

Only the connection's owner uses it, one exchange at a time: replies are matched to commands by order,
and any failure mid-exchange drops the connection, so a late reply can never be taken for the next
call's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from service.errors import StorageUnavailable

_READ_SIZE = 1 << 16


class Unsupported(RuntimeError):
    """This redis-py's connections do not expose their streams; the caller uses the client instead."""


class ScriptLine:
    """Pipelined exchanges on one connection of its own, made from the client's pool settings."""

    def __init__(self, redis: Redis, *, timeout: float) -> None:
        self._pool = redis.connection_pool
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()
        self._fresh_failure = False

    async def exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write; return their replies in order (error replies as ``hiredis.ReplyError``).

        A connection that turns out to be closed is made again once (a restarted Redis costs no request);
        any other failure, or a timeout, raises ``StorageUnavailable`` and drops the connection.
        """
        packed = b"".join([hiredis.pack_command(command) for command in commands])
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._exchange(packed, len(commands))
            except (ConnectionError, EOFError, asyncio.IncompleteReadError) as exc:
                self.drop()
                if attempt == 2 or not self._fresh_failure:
                    raise StorageUnavailable(f"script call failed: {type(exc).__name__}: {exc}") from exc
            except TimeoutError as exc:
                self.drop()
                raise StorageUnavailable(f"script call timed out after {self._timeout:g} s") from exc
            except (OSError, RedisError, hiredis.ProtocolError) as exc:
                self.drop()
                raise StorageUnavailable(f"script call failed: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                self.drop()  # cancelled mid-exchange: its replies may still come, so the connection goes
                raise
        raise AssertionError("unreachable")

    def drop(self) -> None:
        """Close the connection now (without waiting); the next exchange makes a new one."""
        connection, writer = self._connection, self._writer
        self._connection, self._reader, self._writer = None, None, None
        self._parser = hiredis.Reader()
        with contextlib.suppress(Exception):
            close = getattr(connection, "_close", None)  # redis-py's own silent close: stream closed and forgotten
            if callable(close):
                close()
            elif writer is not None:
                writer.close()

    async def close(self) -> None:
        connection = self._connection
        self.drop()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    async def _exchange(self, packed: bytes, count: int) -> list[Any]:
        self._fresh_failure = False
        if self._writer is None or self._reader is None or self._reader.at_eof():
            await self._connect()
        else:
            # An established connection may have been closed by Redis since its last use (restart, idle
            # timeout): that shows only now, and is worth one retry on a new connection.
            self._fresh_failure = True
        reader, writer, parser = self._reader, self._writer, self._parser
        assert reader is not None
        assert writer is not None
        writer.write(packed)
        replies: list[Any] = []
        while len(replies) < count:
            reply = parser.gets()
            if reply is False:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise EOFError("Redis closed the connection")
                parser.feed(data)
                continue
            self._fresh_failure = False
            replies.append(reply)
        return replies

    async def _connect(self) -> None:
        self.drop()
        connection: AbstractConnection = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.disconnect()
            raise
        reader, writer = getattr(connection, "_reader", None), getattr(connection, "_writer", None)
        if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
            with contextlib.suppress(Exception):
                await connection.disconnect()
            raise Unsupported(f"{type(connection).__name__} does not expose its streams")
        self._connection, self._reader, self._writer = connection, reader, writer
