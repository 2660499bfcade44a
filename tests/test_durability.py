"""SPEC §5.6: the start-up durability check and QBO_MIN_REPLICAS, against real redis-servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from starlette.testclient import TestClient

from service.app import create_app
from service.client import check_durability, durability_problems, make_redis
from service.embedded import EmbeddedRedis
from service.errors import ConfigurationError
from service.settings import Settings
from tests.helpers import post, register
from tests.procs import free_port
from tests.test_http import ce_body


@pytest.mark.parametrize(
    ("config", "problems"),
    [
        ({"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}, 0),
        ({"appendonly": "no", "appendfsync": "always", "maxmemory-policy": "noeviction"}, 1),
        ({"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}, 1),
        ({"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "volatile-lru"}, 1),
        ({"appendonly": "no", "appendfsync": "no", "maxmemory-policy": "allkeys-lru"}, 2),
    ],
    ids=["durable", "no-aof", "everysec", "evicting", "neither"],
)
def test_durability_problems(config: dict[str, str], problems: int) -> None:
    assert len(durability_problems(config)) == problems


@pytest.fixture
def lax_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, port=free_port(), extra_config={"appendfsync": "everysec"})
    server.start()
    yield server
    server.stop()


async def test_warns_or_refuses_a_redis_that_can_lose_writes(
    lax_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_redis(lax_redis.url)
    problems = await check_durability(client, require=False)
    assert problems
    assert "appendfsync" in caplog.text
    with pytest.raises(ConfigurationError, match="QBO_REQUIRE_DURABLE"):
        await check_durability(client, require=True)
    await client.aclose()


def test_the_app_refuses_to_start_when_durability_is_required(lax_redis: EmbeddedRedis) -> None:
    settings = Settings(_env_file=None, redis_url=lax_redis.url, require_durable=True)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError), TestClient(create_app(settings)):
        pass


def test_min_replicas_waits_for_a_replica_else_503(tmp_path: Path) -> None:
    primary = EmbeddedRedis(tmp_path / "primary", port=free_port())
    replica = EmbeddedRedis(tmp_path / "replica", port=free_port())
    primary.start()
    replica.start()
    try:
        sync = redis_sync.Redis.from_url(primary.url, decode_responses=True)
        redis_sync.Redis.from_url(replica.url).replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 15
        while sync.info("replication").get("slave0", {}).get("state") != "online":
            assert time.monotonic() < deadline, "the replica did not connect"
            time.sleep(0.1)
        register(sync, "123", "tok")
        settings = Settings(_env_file=None, redis_url=primary.url, min_replicas=1,  # type: ignore[call-arg]
                            response_budget_seconds=1.0)  # fmt: skip
        with TestClient(create_app(settings)) as client:
            assert post(client, ce_body("123", "1"), "tok").status_code == 200
            replica.kill()
            response = post(client, ce_body("123", "2"), "tok")
            assert response.status_code == 503  # written on the primary, but not known to be replicated
            assert response.headers["retry-after"]
        sync.close()
    finally:
        replica.stop()
        primary.stop()


def test_serve_refuses_in_one_line(lax_redis: EmbeddedRedis) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBO_") or k == "QBO_REDIS_SERVER"}
    env.update(QBO_REDIS_URL=lax_redis.url, QBO_REQUIRE_DURABLE="true", QBO_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "service", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "QBO_REQUIRE_DURABLE" in done.stderr
    assert "appendfsync" in done.stderr
    assert "Traceback" not in done.stderr
