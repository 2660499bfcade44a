"""End to end: `qbo-webhooks serve` as a real process over TCP, driven by the CLI, as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as redis_sync

from service.embedded import EmbeddedRedis
from tests.helpers import FIXTURES, REAL_TOKEN, entries
from tests.procs import free_port

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@contextmanager
def serving(env: dict[str, str], port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the service exited: {process.stderr.read() if process.stderr else ''!r}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "the service did not become healthy"
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBO_") or k == "QBO_REDIS_SERVER"}
    env.update(extra)
    return env


def test_serve_register_send_test_and_read_the_stream(redis_url: str, sync_redis: redis_sync.Redis) -> None:
    port = free_port()
    env = base_env(QBO_REDIS_URL=redis_url)
    with serving(env, port):
        put = cli(
            "connections",
            "put",
            "4620816365020074550",
            "--verifier-token",
            REAL_TOKEN,
            "--environment",
            "sandbox",
            env=env,
        )
        assert put.returncode == 0, put.stderr
        assert REAL_TOKEN not in put.stdout
        url = f"http://127.0.0.1:{port}/webhooks/quickbooks"
        sent = cli(
            "send-test",
            "--url",
            url,
            "--token",
            REAL_TOKEN,
            "--body",
            str(FIXTURES / "legacy-real-signed.json"),
            env=env,
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith("200 ")
        generated = cli(
            "send-test",
            "--url",
            url,
            "--token",
            REAL_TOKEN,
            "--realm-id",
            "4620816365020074550",
            "--format",
            "legacy",
            "--entity",
            "Bill",
            "--operation",
            "Void",
            env=env,
        )
        assert generated.stdout.startswith("200 "), generated.stdout + generated.stderr
        forged = cli(
            "send-test", "--url", url, "--token", "not-the-token", "--realm-id", "4620816365020074550", env=env
        )
        assert forged.returncode == 1
        assert forged.stdout.startswith("401 ")
        tail = cli("events", "tail", env=env)
    queued = [fields for _, fields in entries(sync_redis, "qbo:events")]
    assert [(e["entity"], e["operation"], e["format"]) for e in queued] == [
        ("Invoice", "Create", "legacy"),
        ("Bill", "Void", "legacy"),
    ]
    assert tail.returncode == 0
    assert len(tail.stdout.splitlines()) == 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_without_redis_url_runs_and_stops_the_embedded_redis(tmp_path: Path, workers: str) -> None:
    port = free_port()
    env = base_env(QBO_DATA_DIR=str(tmp_path / "data"))
    with serving(env, port, "--workers", workers) as process:
        token = "embedded-token"
        assert cli("connections", "put", "555", "--verifier-token", token, env=env).returncode == 0
        url = f"http://127.0.0.1:{port}/webhooks/quickbooks"
        for entity_id in ("1", "2", "3"):
            sent = cli(
                "send-test", "--url", url, "--token", token, "--realm-id", "555", "--entity-id", entity_id, env=env
            )
            assert sent.stdout.startswith("200 "), sent.stdout + sent.stderr
        tail = cli("events", "tail", "--from-start", env=env)
        assert len(tail.stdout.splitlines()) == 3
        # Whichever worker answers, /metrics counts the deliveries of all of them (files refresh each second).
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
            if 'qbo_webhook_requests_total{status="200"} 3.0' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
        sock_dir = tmp_path / "data" / "redis"
        assert (sock_dir / "appendonly.aof").exists() or (sock_dir / "appendonlydir").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        log = process.stderr.read().decode() if process.stderr else ""
    # Every worker logs as a single server does (uvicorn spawns workers without the parent's logging).
    assert log.count("hot-path modules: ") == int(workers), log
    answered = [line for line in log.splitlines() if " INFO " in line and "webhook request_id=" in line]
    assert [" status=200 " in line for line in answered] == [True] * 3, log
    # The embedded Redis stopped with the service: the socket no longer answers.
    probe = redis_sync.Redis(unix_socket_path=str(tmp_path / "data" / "redis" / "redis.sock"), socket_timeout=1)
    with pytest.raises(redis_sync.ConnectionError):
        probe.ping()
    probe.close()


def test_the_service_keeps_its_embedded_redis_alive(tmp_path: Path) -> None:
    """A CLI command that started the embedded Redis ends, or Redis dies: the service carries on."""
    port = free_port()
    env = base_env(QBO_DATA_DIR=str(tmp_path / "data"))
    first_user = EmbeddedRedis(tmp_path / "data")
    first_user.start()  # like `qbo-webhooks consume` started before `make run`
    with serving(env, port):
        assert cli("connections", "put", "555", "--verifier-token", "tok", env=env).returncode == 0
        first_user.release()  # the service is still connected: Redis must stay up
        url = f"http://127.0.0.1:{port}/webhooks/quickbooks"
        sent = cli("send-test", "--url", url, "--token", "tok", "--realm-id", "555", env=env)
        assert sent.stdout.startswith("200 "), sent.stdout + sent.stderr
        first_user.kill()  # Redis dies outright: the service starts it again from its append-only file
        deadline = time.monotonic() + 20
        while True:
            sent = cli("send-test", "--url", url, "--token", "tok", "--realm-id", "555", "--entity-id", "2", env=env)
            if sent.stdout.startswith("200 "):
                break
            assert time.monotonic() < deadline, sent.stdout + sent.stderr
            time.sleep(0.5)
        tail = cli("events", "tail", "--from-start", env=env)
        assert len(tail.stdout.splitlines()) == 2
    assert not first_user._answers()  # and the service stopped it when it exited
