"""Chaos: real uvicorn over TCP, a real redis-server (AOF, appendfsync always), a simulated Intuit.

Redis and the service are killed with SIGKILL during a sustained run and restarted; at the end every
event sent is in ``qbo:events`` exactly once and no delivery was answered 200 for an event that is missing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from service.embedded import EmbeddedRedis
from service.simulator import Delivery, RetrySchedule, SimulationReport, Simulator, build_deliveries, make_realms
from tests.helpers import WEBHOOK, events, register
from tests.procs import ServiceProcess, free_port, read_answer, request_head

pytestmark = pytest.mark.slow

TOKENS = ("chaos-app-token-a", "chaos-app-token-b")


class Progress:
    """200s seen so far, counted from the simulator's thread."""

    def __init__(self) -> None:
        self.ok = 0
        self._lock = threading.Lock()

    def __call__(self, delivery: Delivery, status: str) -> None:
        if status == "200":
            with self._lock:
                self.ok += 1

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ok < count and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, port=free_port())
    server.start()
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)  # in case a test stopped while Redis was paused
    server.stop()


@pytest.fixture
def realm_tokens(durable_redis: EmbeddedRedis) -> dict[str, str]:
    realms = make_realms(24)
    tokens = {realm: TOKENS[i % 2] for i, realm in enumerate(realms)}
    with redis_sync.Redis.from_url(durable_redis.url, decode_responses=True) as r:
        for realm, token in tokens.items():
            register(r, realm, token)
    return tokens


def run_in_thread(simulator: Simulator, deliveries: list[Delivery], deadline: float) -> Future[SimulationReport]:
    result: Future[SimulationReport] = Future()

    def target() -> None:
        try:
            result.set_result(asyncio.run(simulator.run(deliveries, deadline_seconds=deadline)))
        except BaseException as exc:  # handed to the test thread
            result.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return result


def stream_audit(url: str, report: SimulationReport) -> dict[str, Any]:
    with redis_sync.Redis.from_url(url, decode_responses=True) as r:
        ids = [fields["event_id"] for fields in events(r)]
        dead_letters = int(r.xlen("qbo:events:dead"))
    stored = set(ids)
    return {
        "deliveries": report.deliveries,
        "events_sent": len(report.sent_event_ids),
        "attempts": report.attempts,
        "retries": report.retries,
        "acknowledged_200": report.acknowledged,
        "non_200": report.non_200,
        "answers": dict(sorted(report.statuses.items())),
        "unacknowledged": len(report.unacknowledged),
        "entries": len(ids),
        "duplicates": len(ids) - len(stored),
        "lost": len(report.sent_event_ids - stored),
        "acknowledged_but_missing": len(report.acknowledged_event_ids - stored),
        "unexpected_entries": len(stored - report.sent_event_ids),
        "dead_letters": dead_letters,
    }


def test_nothing_lost_or_doubled_when_redis_and_service_are_killed(
    tmp_path: Path, durable_redis: EmbeddedRedis, realm_tokens: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    service = ServiceProcess(durable_redis.url, tmp_path).start()
    deliveries = build_deliveries(realm_tokens, 600, "mixed", seed=20261203)
    progress = Progress()
    simulator = Simulator(
        service.url,
        concurrency=6,
        schedule=RetrySchedule(cap=0.5, give_up_after=45.0),
        request_timeout=15.0,  # a loaded 2-core machine must not turn a slow answer into "no answer"
        on_answer=progress,
    )
    outcome = run_in_thread(simulator, deliveries, deadline=45.0)
    redis_kills = service_kills = pauses = 0
    try:
        schedule = (
            (60, "redis"),
            (140, "pause"),
            (200, "redis"),
            (260, "service"),
            (330, "redis"),
            (400, "service"),
            (470, "redis"),
        )
        for threshold, victim in schedule:
            progress.wait_for(threshold)
            if victim == "pause":
                # Redis stalls (SIGSTOP): requests time out with 503 while their writes wait, then run on SIGCONT.
                assert durable_redis.pid is not None
                os.kill(durable_redis.pid, signal.SIGSTOP)
                time.sleep(3.0)  # longer than the response budget (2 s)
                os.kill(durable_redis.pid, signal.SIGCONT)
                pauses += 1
            elif victim == "redis":
                durable_redis.kill()
                time.sleep(0.3)  # the service answers 503 meanwhile; the simulator retries
                durable_redis.start()  # same data directory: the AOF is reloaded
                redis_kills += 1
            else:
                service.kill()
                time.sleep(0.2)
                service.start()
                service_kills += 1
        report = outcome.result(timeout=60)
    finally:
        service.kill()
    figures = stream_audit(durable_redis.url, report)
    with capsys.disabled():
        kills = f"redis kill -9 x{redis_kills}, redis SIGSTOP x{pauses}, service kill -9 x{service_kills}"
        print(f"\nchaos run ({kills}): {figures}")
    assert figures["unacknowledged"] == 0, figures
    assert figures["duplicates"] == 0, figures
    assert figures["lost"] == 0, figures
    assert figures["acknowledged_but_missing"] == 0, figures
    assert figures["unexpected_entries"] == 0, figures
    assert figures["dead_letters"] == 0, figures
    assert figures["entries"] == figures["events_sent"]
    # The chaos did bite: some attempts failed and were retried, and the restarts happened.
    assert figures["non_200"] > 0
    assert figures["retries"] > 0
    assert (redis_kills, pauses, service_kills, service.starts) == (4, 1, 2, 3)


def test_sigterm_answers_every_request_in_flight(
    tmp_path: Path, durable_redis: EmbeddedRedis, realm_tokens: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    service = ServiceProcess(durable_redis.url, tmp_path).start()
    in_flight = build_deliveries(realm_tokens, 8, "mixed", seed=1)
    load = build_deliveries(realm_tokens, 200, "mixed", seed=2)
    progress = Progress()
    simulator = Simulator(
        service.url,
        concurrency=4,
        schedule=RetrySchedule(cap=0.3, give_up_after=40.0),
        request_timeout=15.0,
        on_answer=progress,
    )
    # Requests the server has started on: headers and half the body sent, the rest withheld until after SIGTERM.
    sockets = []
    for delivery in in_flight:
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=15)
        head = request_head(
            "POST",
            WEBHOOK,
            len(delivery.body),
            [("intuit-signature", delivery.signature), ("content-type", delivery.content_type)],
        )
        sock.sendall(head + delivery.body[: len(delivery.body) // 2])
        sockets.append(sock)
    outcome = run_in_thread(simulator, load, deadline=40.0)
    try:
        progress.wait_for(50)
        time.sleep(0.2)  # lets the server parse the withheld requests' headers: they are in flight
        service.terminate()
        time.sleep(0.3)  # shutdown has begun: the listener is closed, in-flight requests are waited for
        statuses = []
        for delivery, sock in zip(in_flight, sockets, strict=True):
            with sock:
                sock.sendall(delivery.body[len(delivery.body) // 2 :])
                statuses.append(read_answer(sock).status)  # raises if the connection closes without an answer
        exit_code = service.wait(timeout=20)
        service.start()  # Intuit keeps retrying: the rest gets through after the restart
        report = outcome.result(timeout=50)
    finally:
        service.kill()
    figures = stream_audit(durable_redis.url, report)
    with redis_sync.Redis.from_url(durable_redis.url, decode_responses=True) as r:
        stored = {fields["event_id"] for fields in events(r)}
    answered_by_server = service.log().count(" webhook request_id=")
    answered_to_clients = sum(n for status, n in report.statuses.items() if status != "no-answer") + len(statuses)
    with capsys.disabled():
        print(f"\nSIGTERM under load: in-flight statuses {statuses}, exit code {exit_code}, {figures}")
    assert set(statuses) <= {200, 503}, statuses
    for delivery, status in zip(in_flight, statuses, strict=True):
        if status == 200:
            assert set(delivery.event_ids) <= stored
    assert exit_code == 0
    # Every request the server handled reached its client: none was dropped unanswered by the shutdown.
    assert answered_by_server == answered_to_clients
    assert (figures["unacknowledged"], figures["lost"], figures["duplicates"]) == (0, 0, 0), figures
    assert figures["acknowledged_but_missing"] == 0, figures


def test_sigterm_stops_the_embedded_redis(tmp_path: Path) -> None:
    """SPEC §7: the embedded Redis is stopped with the service, a graceful SIGTERM included."""
    service = ServiceProcess(None, tmp_path).start()
    embedded = EmbeddedRedis(tmp_path / "data")
    try:
        assert embedded._answers()
        service.terminate()
        assert service.wait(timeout=20) == 0
    finally:
        service.kill()
    assert not embedded._answers(), "redis-server outlived the service"
