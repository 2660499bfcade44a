"""The load generator: a separate process that keeps N keep-alive connections busy with pre-built requests.

``python -m bench.load --pool FILE --port P ...`` prints one JSON object. Each connection sends its next
request as soon as the previous response arrived (closed loop, fixed concurrency). After the warm-up it
measures for ``--duration`` seconds, then stops sending and waits for the requests still in flight, so
every request sent gets its answer counted: that is what makes the benchmark's count check exact.

Written on raw asyncio protocols (uvloop when present) with no HTTP library on the hot path; ``run.py``
reports its CPU use next to the server's to show it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from bench.procstat import busy_between, cpu_ticks, tree_cpu_seconds
from bench.traffic import read_pool

DRAIN_SECONDS = 10.0


@dataclass
class Tally:
    """What the responses said: statuses and the counts 200 bodies report."""

    statuses: Counter[int] = field(default_factory=Counter)
    accepted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    @classmethod
    def of(cls, answers: list[tuple[int, bytes]]) -> Tally:
        """The tally of ``(status, body)`` answers (status 0: the connection was lost)."""
        tally = cls()
        for status, body in answers:
            tally.statuses[status] += 1
            if status == 200:
                counts = orjson.loads(body)
                tally.accepted += int(counts.get("accepted", 0))
                tally.duplicates += int(counts.get("duplicates", 0))
                tally.dead_lettered += int(counts.get("dead_lettered", 0))
        return tally


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self, owner: LoadGenerator) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent_at = 0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast rather than an isinstance check.
        self.transport = cast("asyncio.Transport", transport)
        self.owner.connections.append(self)
        self.owner.send_next(self)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.sent_at = time.perf_counter_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        # The load generator shares a core with Redis (SPEC §8), so its per-response work is kept small: no
        # copies of the head (uvicorn writes header names lower-cased), bodies tallied after the run.
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        marker = buffer.find(b"content-length:", 0, end)
        if marker < 0:
            marker = bytes(buffer[:end]).lower().find(b"content-length:")
        if marker >= 0:
            stop = buffer.find(b"\r\n", marker, end)
            length = int(buffer[marker + 15 : stop if stop >= 0 else end])
        total = end + 4 + length
        if len(buffer) < total:
            return
        status = int(buffer[9:12])
        body = bytes(buffer[end + 4 : total])
        del buffer[:total]
        self.busy = False
        self.owner.completed(self, status, body, time.perf_counter_ns() - self.sent_at)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(self)


class LoadGenerator:
    def __init__(self, pool: list[bytes], host: str, port: int, connections: int) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.size = connections
        self.connections: list[Connection] = []
        self.sent = 0
        self.sending = True
        self.measuring = False
        self.answers: list[tuple[int, bytes]] = []  # every answer, warm-up and drain included (the count check)
        self.window = slice(0, 0)  # the answers completed inside the measured window
        self.latencies_ns: list[int] = []  # of the window's answers
        self.errors = 0
        self.idle = asyncio.Event()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            await loop.create_connection(lambda: Connection(self), self.host, self.port)

    def send_next(self, conn: Connection) -> None:
        if not self.sending:
            if not any(c.busy for c in self.connections):
                self.idle.set()
            return
        request = self.pool[self.sent % len(self.pool)]
        self.sent += 1
        conn.send(request)

    def start_window(self) -> None:
        self.measuring = True
        self.window = slice(len(self.answers), len(self.answers))

    def end_window(self) -> None:
        self.measuring = False
        self.window = slice(self.window.start, len(self.answers))

    def completed(self, conn: Connection, status: int, body: bytes, latency_ns: int) -> None:
        self.answers.append((status, body))
        if self.measuring:
            self.latencies_ns.append(latency_ns)
        self.send_next(conn)

    def lost(self, conn: Connection) -> None:
        if conn.busy:
            conn.busy = False
            self.errors += 1
            self.answers.append((0, b""))
        if conn in self.connections:
            self.connections.remove(conn)
        if self.sending:  # keep the concurrency fixed
            asyncio.get_running_loop().create_task(self._reconnect())
        elif not any(c.busy for c in self.connections):
            self.idle.set()

    async def _reconnect(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.errors += 1

    async def stop_and_drain(self) -> int:
        """Stop sending; wait for the requests in flight. Returns how many never got an answer."""
        self.sending = False
        if any(c.busy for c in self.connections):
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    await self.idle.wait()
            except TimeoutError:
                pass
        unanswered = sum(1 for c in self.connections if c.busy)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        return unanswered


def _commandstats(client: redis.Redis | None) -> dict[str, int]:
    if client is None:
        return {}
    raw: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in raw.items()}


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def _percentile(ordered: list[int], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pool = read_pool(Path(args.pool))
    pids = dict(item.split("=", 1) for item in args.pid)
    watched = {name: int(pid) for name, pid in pids.items()}
    stats_client = redis.Redis.from_url(args.redis_url) if args.redis_url else None
    gen = LoadGenerator(pool, "127.0.0.1", args.port, args.connections)
    await gen.open()
    await asyncio.sleep(args.warmup)

    before_cmds = _commandstats(stats_client)
    before_cpu = _cpu(watched)
    before_self = time.process_time()
    before_cores = cpu_ticks()
    gen.start_window()
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    gen.end_window()
    elapsed = time.perf_counter() - started
    after_self = time.process_time()
    after_cores = cpu_ticks()
    after_cpu = _cpu(watched)
    after_cmds = _commandstats(stats_client)

    unanswered = await gen.stop_and_drain()
    if stats_client is not None:
        stats_client.close()
    latencies = sorted(gen.latencies_ns)
    window, total = Tally.of(gen.answers[gen.window]), Tally.of(gen.answers)
    window_ok = window.statuses.get(200, 0)
    completed = sum(window.statuses.values()) - window.statuses.get(0, 0)
    cpu = {name: (after_cpu[name] - before_cpu[name]) / elapsed for name in watched}
    cpu["load"] = (after_self - before_self) / elapsed
    cores = busy_between(before_cores, after_cores)
    return {
        "seconds": elapsed,
        "requests_per_second": completed / elapsed,
        "ok_per_second": window_ok / elapsed,
        "latency_ms": {
            "p50": _percentile(latencies, 0.50),
            "p90": _percentile(latencies, 0.90),
            "p99": _percentile(latencies, 0.99),
            "max": latencies[-1] / 1e6 if latencies else 0.0,
        },
        "window": {
            "responses": completed,
            "statuses": {str(k): v for k, v in sorted(window.statuses.items())},
            "accepted": window.accepted,
        },
        "total": {
            "sent": gen.sent,
            "unanswered": unanswered,
            "connection_errors": gen.errors,
            "statuses": {str(k): v for k, v in sorted(total.statuses.items())},
            "accepted": total.accepted,
            "duplicates": total.duplicates,
            "dead_lettered": total.dead_lettered,
        },
        "pool": len(pool),
        "pool_wrapped": gen.sent > len(pool),
        "cpu_busy": cpu,
        # Everything the machine did, per core; minus the processes above, what other work (and the kernel) took.
        "cores_busy": cores,
        "other_cpu": max(0.0, sum(cores.values()) - sum(cpu.values())),
        "commandstats": {
            name: after_cmds.get(name, 0) - before_cmds.get(name, 0)
            for name in sorted(set(after_cmds) | set(before_cmds))
            if after_cmds.get(name, 0) != before_cmds.get(name, 0)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", required=True, help="file of raw requests written by bench.traffic.write_pool")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--redis-url", help="take INFO commandstats at the window's edges")
    parser.add_argument("--pid", action="append", default=[], help="NAME=PID whose CPU use to report")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
