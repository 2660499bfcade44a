"""The simulated Intuit: what it builds, how it retries, and ``qbo-webhooks simulate`` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis as redis_sync

from service.models import Event
from service.payloads import parse_body
from service.signature import sign
from service.simulator import RetrySchedule, Simulator, build_deliveries, make_realms, read_status
from tests.helpers import events
from tests.procs import ServiceProcess


def test_deliveries_are_signed_per_app_in_both_formats() -> None:
    realms = make_realms(6)
    tokens = {realm: ("app-1", "app-2")[i % 2] for i, realm in enumerate(realms)}
    deliveries = build_deliveries(tokens, 40, "mixed", seed=7)
    assert Counter(d.format for d in deliveries) == {"legacy": 20, "cloudevents": 20}
    for delivery in deliveries:
        parsed = parse_body(delivery.body)
        named = parsed.realm_ids()
        assert len({tokens[realm] for realm in named}) == 1  # one app signs each body
        assert delivery.signature == sign(tokens[next(iter(named))], delivery.body)
        assert delivery.event_ids == tuple(item.event_id for item in parsed.items if isinstance(item, Event))
        assert all(int(realm) > 2**53 for realm in named)
    # Now and then the same changes come again in the other format: the event ids repeat.
    seen: set[str] = set()
    repeats = 0
    for delivery in deliveries:
        repeats += bool(seen & set(delivery.event_ids))
        seen |= set(delivery.event_ids)
    assert repeats >= 3
    assert [d.body for d in build_deliveries(tokens, 5, "legacy", seed=1, now=1.7e9)] == [
        d.body for d in build_deliveries(tokens, 5, "legacy", seed=1, now=1.7e9)
    ]


def test_retry_schedule_is_compressed_and_capped() -> None:
    schedule = RetrySchedule()
    assert [schedule.delay(n) for n in range(1, 8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_every_non_200_is_retried_until_200() -> None:
    """A receiver that fails each delivery twice (a 503, then a dropped connection) before answering 200."""
    tries: Counter[bytes] = Counter()

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        tries[body] += 1
        if tries[body] == 2:
            writer.close()  # no answer at all
            return
        status = b"503 Service Unavailable" if tries[body] == 1 else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    deliveries = build_deliveries(dict.fromkeys(make_realms(3), "t"), 12, "mixed", seed=3)
    async with server:
        simulator = Simulator(f"http://127.0.0.1:{port}/webhooks/quickbooks", concurrency=4)
        report = await simulator.run(deliveries, deadline_seconds=30)
    assert report.statuses == {"503": 12, "no-answer": 12, "200": 12}
    assert (report.attempts, report.retries, report.acknowledged, report.unacknowledged) == (36, 24, 12, [])
    assert report.acknowledged_event_ids == report.sent_event_ids
    assert report.summary()["events_sent"] == len(report.sent_event_ids)


async def test_status_reader_refuses_what_is_not_http() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"SSH-2.0-OpenSSH\r\n")
    reader.feed_eof()
    with pytest.raises(ValueError, match="no HTTP answer"):
        await read_status(reader)


@pytest.mark.slow
def test_simulate_command_registers_sends_and_reports(
    tmp_path: Path, redis_url: str, sync_redis: redis_sync.Redis
) -> None:
    service = ServiceProcess(redis_url, tmp_path).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QBO_")} | {"QBO_REDIS_URL": redis_url}
        args = ["simulate", "--url", service.url, "--token", "sim-token", "--realms", "5", "--deliveries", "30"]
        result = subprocess.run(
            [sys.executable, "-m", "service", *args, "--register", "--seed", "9"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        service.kill()
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["deliveries"], summary["acknowledged"], summary["unacknowledged"]) == (30, 30, 0)
    stored = [fields["event_id"] for fields in events(sync_redis)]
    assert len(stored) == len(set(stored)) == summary["events_sent"]
    assert sync_redis.xlen("qbo:events:dead") == 0
