"""/metrics through the real app; JSON logs; neither ever carries a secret or a realm id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from service import logs
from service.metrics import Metrics, merge
from tests.helpers import WEBHOOK, post, register
from tests.test_http import ce_body


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_counters_move_as_requests_are_made(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "4242", "metrics-token-SECRET")
    before = scrape(client)
    assert post(client, ce_body("4242", "1"), "metrics-token-SECRET").status_code == 200
    assert post(client, ce_body("4242", "1"), "metrics-token-SECRET").status_code == 200  # duplicate
    mixed = b'[{"type":"nonsense","intuitaccountid":"4242"},' + ce_body("4242", "2")[1:]
    assert post(client, mixed, "metrics-token-SECRET").status_code == 200
    assert post(client, ce_body("4242", "3"), "wrong").status_code == 401
    assert client.post(WEBHOOK, content=b"[]").status_code == 401
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("qbo_webhook_requests_total", status="200") == 3
    assert delta("qbo_webhook_requests_total", status="401") == 2
    assert delta("qbo_webhook_events_total", outcome="accepted") == 2
    assert delta("qbo_webhook_events_total", outcome="duplicate") == 1
    assert delta("qbo_webhook_events_total", outcome="invalid_event") == 1
    assert delta("qbo_signature_failures_total", reason="no_candidate_verified") == 1
    assert delta("qbo_signature_failures_total", reason="missing") == 1
    assert delta("qbo_webhook_request_duration_seconds_count") == 5
    assert delta("qbo_webhook_request_duration_seconds_bucket", le="+Inf") == 5
    text = client.get("/metrics").text
    assert "4242" not in text
    assert "metrics-token-SECRET" not in text


def test_redis_errors_are_counted(client_factory: Callable[..., Any]) -> None:
    with client_factory(redis_url="redis://127.0.0.1:1/0", response_budget_seconds=0.5) as client:
        register_free = post(client, ce_body("1"), "tok")
        assert register_free.status_code == 503
        samples = scrape(client)
    assert samples[("qbo_webhook_errors_total", (("cause", "redis"),))] == 1
    assert samples[("qbo_redis_errors_total", ())] == 1


def test_snapshots_of_workers_sum() -> None:
    one, two = Metrics(), Metrics()
    one.observe(200, 0.003)
    two.observe(200, 0.3)
    two.observe(401, 0.001)
    one.events["accepted"] += 2
    total = merge([one.snapshot(), two.snapshot()])
    assert total["requests"] == {"200": 2, "401": 1}
    assert total["events"] == {"accepted": 2}
    assert sum(total["latency_buckets"]) == 3


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("DEBUG", "json", stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_logs_are_one_object_per_line_without_secrets(
    json_logs: io.StringIO, client: TestClient, sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "4242", "log-token-SECRET")
    body = ce_body("4242")
    assert post(client, body, "log-token-SECRET").status_code == 200
    assert post(client, body, "not-it").status_code == 401
    lines = [line for line in json_logs.getvalue().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    webhook = [r for r in records if r["logger"] == "service.http"]
    assert [r["status"] for r in webhook] == [200, 401]
    assert webhook[0]["accepted"] == 1
    assert webhook[1]["reason"] == "no_candidate_verified"
    assert all({"ts", "level", "message", "request_id", "duration_ms"} <= set(r) for r in webhook)
    everything = "\n".join(lines)
    assert "log-token-SECRET" not in everything
    assert body.decode() not in everything


def test_json_logs_leave_out_uvicorns_coloured_copy_of_the_message(json_logs: io.StringIO) -> None:
    # uvicorn logs e.g. "Started server process" with extra={"color_message": <the same with ANSI codes>}.
    logging.getLogger("uvicorn.error").info("Started %s", "server", extra={"color_message": "\x1b[32mStarted\x1b[0m"})
    (record,) = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
    assert record["message"] == "Started server"
    assert "color_message" not in record
    assert "\x1b" not in json_logs.getvalue()
