"""A dedicated Redis connection for the recorder's script calls: hiredis packs the commands, hiredis parses
the replies, and each reply is handed to its sender's callback in the very callback that read it.

redis-py's per-command machinery (pool checkout, retry wrapper, observability hooks, a timer per read)
costs the client several times what packing a call and parsing its reply do (about 150 µs of CPU per
group-commit call, measured with ``bench/``), and an awaited reply reaches the requests waiting on it
one event-loop turn later than a callback does; under load a turn is a millisecond or more. The line
keeps redis-py for making the connection (address, TLS, AUTH, HELLO, SELECT: whatever the URL says),
then takes its transport over.

Replies are matched to commands by order. Any failure (connection lost, unreadable reply, timeout)
fails every exchange waiting on that connection and closes it, so a late reply can never be taken for
another exchange's; the next ``connect`` makes a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from service.errors import StorageUnavailable

Replies = list[Any]
OnReply = Callable[[Replies | StorageUnavailable], None]


class Unsupported(RuntimeError):
    """This redis-py's connections do not expose their transport; the caller uses the client instead."""


class LostConnection(StorageUnavailable):
    """The connection closed before the replies came (whether Redis ran the commands is unknown)."""


@dataclass(slots=True)
class _Exchange:
    count: int
    on_reply: OnReply
    timer: asyncio.TimerHandle
    replies: Replies = field(default_factory=list)


class _Wire(asyncio.Protocol):
    """The protocol of one connection: its waiting exchanges, in order."""

    def __init__(self, transport: asyncio.Transport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        self.waiting: deque[_Exchange] = deque()
        self.parser = hiredis.Reader()
        self.closed = False

    def send(self, packed: bytes, count: int, on_reply: OnReply) -> None:
        timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)
        self.waiting.append(_Exchange(count, on_reply, timer))
        self.transport.write(packed)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
            while self.waiting:
                exchange = self.waiting[0]
                while len(exchange.replies) < exchange.count:
                    reply = self.parser.gets()
                    if reply is False:
                        return
                    exchange.replies.append(reply)
                self.waiting.popleft()
                exchange.timer.cancel()
                exchange.on_reply(exchange.replies)  # may send the next exchange on this wire
        except hiredis.ProtocolError as exc:
            self.fail(StorageUnavailable(f"unreadable reply from Redis: {exc}"))

    def eof_received(self) -> bool:
        return False  # close; connection_lost fails what is waiting

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {type(exc).__name__}: {exc}" if exc else ""
        self.fail(None, detail)

    def fail(self, error: StorageUnavailable | None, detail: str = "") -> None:
        """Close the connection and fail every exchange waiting on it (``None``: with ``LostConnection``)."""
        self.closed = True
        waiting, self.waiting = self.waiting, deque()
        with contextlib.suppress(Exception):
            self.transport.close()
        for exchange in waiting:
            exchange.timer.cancel()
            exchange.on_reply(error or LostConnection(f"Redis closed the connection{detail}"))

    def _timed_out(self) -> None:
        self.fail(StorageUnavailable(f"script call timed out after {self.timeout:g} s"))


class ScriptLine:
    """One connection of the recorder's own, made from the client's pool settings."""

    def __init__(self, redis: Redis, *, timeout: float) -> None:
        self._pool = redis.connection_pool
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._wire: _Wire | None = None

    @property
    def connected(self) -> bool:
        return self._wire is not None and not self._wire.closed

    async def connect(self) -> None:
        """(Re)connect. Raises ``StorageUnavailable`` when Redis cannot be reached, ``Unsupported`` when this
        redis-py's connection has no transport to take over."""
        self.drop()
        connection: AbstractConnection = self._pool.connection_class(**self._pool.connection_kwargs)
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            writer = getattr(connection, "_writer", None)
            transport = getattr(writer, "transport", None)  # uvloop's transports are not asyncio.Transport subclasses
            if not all(hasattr(transport, name) for name in ("set_protocol", "write", "close", "is_closing")):
                raise Unsupported(f"{type(connection).__name__} does not expose its transport")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await connection.disconnect()
            if isinstance(exc, Exception) and not isinstance(exc, Unsupported | StorageUnavailable):
                raise StorageUnavailable(f"connecting for script calls failed: {type(exc).__name__}: {exc}") from exc
            raise
        self._connection = connection
        self._wire = _Wire(transport, self._timeout)  # type: ignore[arg-type]
        transport.set_protocol(self._wire)  # type: ignore[union-attr]

    def send(self, commands: list[tuple[Any, ...]], on_reply: OnReply) -> None:
        """Send ``commands`` in one write; ``on_reply`` gets their replies in order (error replies as
        ``hiredis.ReplyError``) or a ``StorageUnavailable``. Only on a ``connected`` line."""
        wire = self._wire
        assert wire is not None
        assert not wire.closed
        wire.send(b"".join([hiredis.pack_command(command) for command in commands]), len(commands), on_reply)

    def drop(self) -> None:
        """Close the connection now; what waits on it fails."""
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.fail(StorageUnavailable("connection closed by the recorder"))
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection._close()  # type: ignore[no-untyped-call]  # redis-py's own silent close of its streams

    async def close(self) -> None:
        connection = self._connection
        self.drop()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()
