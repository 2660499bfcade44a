"""Shared fixtures: a real Redis started by the suite (or ``QBO_TEST_REDIS_URL``), the app, signed bodies."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import Redis
from starlette.testclient import TestClient

from service import compiled
from service.app import create_app
from service.embedded import EmbeddedRedis
from service.settings import Settings
from tests.procs import free_port


def pytest_report_header() -> str:
    return f"service modules: {compiled.summary()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # A compiled copy of other source would test old code: refuse rather than pass or fail on it.
    if any(value == "stale" for value in compiled.state().values()):
        pytest.exit(f"service modules: {compiled.summary()}", returncode=4)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of the test's own (TCP), for tests that kill, pause or restart it."""
    server = EmbeddedRedis(tmp_path, port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI configures the root logger; give every test back the logging it started with."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's Redis: ``QBO_TEST_REDIS_URL`` (a database the suite may flush) or a redis-server of its own."""
    url = os.environ.get("QBO_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("suite-redis"))
    yield server.start()
    server.stop()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    """A plain client for assertions; the database is flushed before each test that uses it."""
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def redis(redis_url: str, sync_redis: redis_sync.Redis) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def settings_factory(redis_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"redis_url": redis_url, "connection_cache_seconds": 10.0}
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


ClientFactory = Callable[..., Any]


@pytest.fixture
def client_factory(settings_factory: Callable[..., Settings], sync_redis: redis_sync.Redis) -> Callable[..., Any]:
    """``with client_factory(**settings) as client:`` runs the real app, lifespan included."""

    @contextmanager
    def make(**overrides: Any) -> Iterator[TestClient]:
        app = create_app(settings_factory(**overrides))
        with TestClient(app, raise_server_exceptions=True) as client:
            yield client

    return make


@pytest.fixture
def client(client_factory: Callable[..., Any]) -> Iterator[TestClient]:
    with client_factory() as test_client:
        yield test_client
