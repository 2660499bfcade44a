"""Redis stopped, paused or restarted under the service: 503s, never a 200 without the write."""

from __future__ import annotations

import asyncio

import redis as redis_sync
from starlette.testclient import TestClient

from service.app import create_app
from service.client import make_redis
from service.embedded import EmbeddedRedis
from service.errors import StorageUnavailable
from service.keys import Keys
from service.queue import StreamRecorder
from service.settings import Settings
from tests.helpers import entries, post, register
from tests.test_http import ce_body
from tests.test_queue import make_event


def test_redis_down_gives_503_and_recovers_without_restart(own_redis: EmbeddedRedis) -> None:
    sync = redis_sync.Redis.from_url(own_redis.url, decode_responses=True)
    register(sync, "123", "tok")
    settings = Settings(_env_file=None, redis_url=own_redis.url, response_budget_seconds=1.0)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        assert post(client, ce_body("123", "1"), "tok").status_code == 200
        own_redis.kill()
        for entity_id in ("2", "3"):
            response = post(client, ce_body("123", entity_id), "tok")
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert "Traceback" not in response.text
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        own_redis.start()  # same data directory: the AOF brings the first event back
        assert client.get("/readyz").status_code == 200
        assert post(client, ce_body("123", "2"), "tok").status_code == 200
    assert [fields["entity_id"] for _, fields in entries(sync, "qbo:events")] == ["1", "2"]
    sync.close()


def test_paused_redis_answers_503_within_the_budget(own_redis: EmbeddedRedis) -> None:
    sync = redis_sync.Redis.from_url(own_redis.url, decode_responses=True)
    register(sync, "123", "tok")
    settings = Settings(_env_file=None, redis_url=own_redis.url, response_budget_seconds=0.5)  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        sync.client_pause(3000, all=False)  # writes (and scripts) wait; the request must not
        response = post(client, ce_body("123", "1"), "tok")
        assert response.status_code == 503
    sync.close()


async def test_a_failed_group_commit_fails_every_request_in_it(own_redis: EmbeddedRedis) -> None:
    """Redis dies while a group of requests waits on one script call: none of them is told it was recorded."""
    sync = redis_sync.Redis.from_url(own_redis.url, decode_responses=True)
    client = make_redis(own_redis.url, timeout=2.0)
    recorder = StreamRecorder(client, Keys())
    await recorder.preload()
    sync.client_pause(10_000, all=False)
    tasks = [asyncio.create_task(recorder.record([make_event(n)], [], "t")) for n in range(30)]
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in tasks)
    await asyncio.to_thread(own_redis.kill)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, StorageUnavailable) for result in results), results
    await asyncio.to_thread(own_redis.start)
    assert sync.xlen("qbo:events") == 0  # and indeed nothing was written
    await recorder.close()
    await client.aclose()
    sync.close()
