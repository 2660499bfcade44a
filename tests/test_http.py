"""The webhook route through the real ASGI app and a real Redis: SPEC §3 status table and §4 routing."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis as redis_sync
from starlette.testclient import TestClient

from service.payloads import parse_body
from service.signature import fingerprint, sign
from tests.helpers import (
    REAL_SIGNATURE,
    REAL_TOKEN,
    SAMPLE_TOKEN,
    WEBHOOK,
    dead_letters,
    events,
    fixture_bytes,
    post,
    register,
)

REAL_REALM = "4620816365020074550"


def ce_body(realm: str, entity_id: str = "1", event_type: str = "qbo.customer.updated.v1", **extra: Any) -> bytes:
    event = {
        "specversion": "1.0",
        "id": f"id-{realm}-{entity_id}",
        "source": "intuit.test",
        "type": event_type,
        "time": "2026-03-01T10:00:00Z",
        "intuitentityid": entity_id,
        "intuitaccountid": realm,
        **extra,
    }
    return orjson.dumps([event])


def test_real_delivery_is_accepted_with_its_real_signature(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, REAL_REALM, REAL_TOKEN, "production")
    body = fixture_bytes("legacy-real-signed.json")
    response = client.post(WEBHOOK, content=body, headers={"intuit-signature": REAL_SIGNATURE})
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 0}
    (entry,) = events(sync_redis)
    assert entry["realm_id"] == REAL_REALM
    assert entry["environment"] == "production"
    assert entry["v"] == "1"
    assert entry["format"] == "legacy"
    assert set(entry) == {
        "v",
        "event_id",
        "source_id",
        "realm_id",
        "entity",
        "entity_id",
        "operation",
        "deleted_id",
        "occurred_at",
        "type",
        "format",
        "environment",
        "received_at",
        "payload",
    }
    assert sync_redis.ttl(f"qbo:seen:{entry['event_id']}") > 6 * 86400


@pytest.mark.parametrize(
    "name",
    [
        "legacy-two-entities.json",
        "legacy-merge.json",
        "cloudevents-intuit-sample.json",
        "cloudevents-merge-and-update.json",
    ],
)
def test_every_fixture_is_accepted(name: str, client: TestClient, sync_redis: redis_sync.Redis) -> None:
    body = fixture_bytes(name)
    for realm in parse_body(body).realm_ids():
        register(sync_redis, realm, SAMPLE_TOKEN)
    response = post(client, body, SAMPLE_TOKEN)
    assert response.status_code == 200
    assert response.json()["dead_lettered"] == 0
    assert response.json()["accepted"] == len(events(sync_redis)) >= 1


def test_header_name_is_case_insensitive_and_content_type_is_ignored(
    client: TestClient, sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "tok")
    body = ce_body("123")
    response = client.post(
        WEBHOOK, content=body, headers={"Intuit-Signature": sign("tok", body), "content-type": "text/plain"}
    )
    assert response.status_code == 200


def test_trailing_slash_works_without_redirect(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "tok")
    body = ce_body("123")
    response = client.post(
        WEBHOOK + "/", content=body, headers={"intuit-signature": sign("tok", body)}, follow_redirects=False
    )
    assert response.status_code == 200
    assert len(events(sync_redis)) == 1


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"intuit-signature": ""}, id="empty"),
        pytest.param({"intuit-signature": "zz"}, id="garbage"),
        pytest.param({"intuit-signature": base64.b64encode(b"x" * 32).decode()}, id="wrong-signature"),
    ],
)
def test_401_writes_nothing_and_says_nothing(
    headers: dict[str, str], client: TestClient, sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "tok")
    before = sync_redis.dbsize()
    response = client.post(WEBHOOK, content=ce_body("123"), headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "not authenticated"}
    assert sync_redis.dbsize() == before


def test_signature_header_sent_twice_is_401(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "tok")
    body = ce_body("123")
    signature = sign("tok", body)
    response = client.post(
        WEBHOOK, content=body, headers=[("intuit-signature", signature), ("intuit-signature", signature)]
    )
    assert response.status_code == 401
    assert events(sync_redis) == []


def test_413_while_streaming_and_from_content_length(
    client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "tok")
    with client_factory(max_body_bytes=2048) as client:
        big = b"[" + b" " * 4096 + b"]"

        def chunks() -> Any:  # no Content-Length: the cap must be enforced as bytes arrive
            yield big[:1000]
            yield big[1000:]

        assert client.post(WEBHOOK, content=chunks(), headers={"intuit-signature": sign("tok", big)}).status_code == 413
        assert post(client, big, "tok").status_code == 413
        just_under = b"[" + b" " * 2045 + b"]"
        assert len(just_under) == 2047
        assert post(client, just_under, "tok").status_code == 200
    assert events(sync_redis) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD"])
def test_other_methods_are_405(method: str, client: TestClient) -> None:
    assert client.request(method, WEBHOOK).status_code == 405


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_empty_authentic_bodies_are_200(client_factory: Callable[..., Any], sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "tok")  # before start-up: the start-up SCAN puts its token in the index
    with client_factory() as client:
        for body in (b"[]", b'{"eventNotifications":[]}'):
            response = post(client, body, "tok")
            assert response.status_code == 200
            assert response.json() == {"accepted": 0, "duplicates": 0, "dead_lettered": 0}
    assert sync_redis.xlen("qbo:events") == 0


def test_same_body_twice_is_queued_once(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "tok")
    body = ce_body("123")
    assert post(client, body, "tok").json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 0}
    assert post(client, body, "tok").json() == {"accepted": 0, "duplicates": 1, "dead_lettered": 0}
    assert len(events(sync_redis)) == 1


def test_same_change_as_legacy_then_cloudevents_is_queued_once(
    client: TestClient, sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "tok")
    old = orjson.dumps(
        {
            "eventNotifications": [
                {
                    "realmId": "123",
                    "dataChangeEvent": {
                        "entities": [
                            {
                                "name": "Customer",
                                "id": "1",
                                "operation": "Update",
                                "lastUpdated": "2026-03-01T02:00:00.000-08:00",
                            }
                        ]
                    },
                }
            ]
        }
    )
    assert post(client, old, "tok").json()["accepted"] == 1
    assert post(client, ce_body("123"), "tok").json() == {"accepted": 0, "duplicates": 1, "dead_lettered": 0}
    assert len(events(sync_redis)) == 1


def test_duplicate_within_one_body_is_queued_once(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "tok")
    event = json.loads(ce_body("123"))[0]
    response = post(client, orjson.dumps([event, event]), "tok")
    assert response.json() == {"accepted": 1, "duplicates": 1, "dead_lettered": 0}


def test_unknown_realm_is_dead_lettered_when_a_known_token_verifies(
    client: TestClient, sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "tok")
    sync_redis.hset("qbo:verifier-tokens", fingerprint("tok"), orjson.dumps({"token": "tok", "last_seen": 9e9}))
    response = post(client, ce_body("999"), "tok")
    assert response.status_code == 200
    assert response.json() == {"accepted": 0, "duplicates": 0, "dead_lettered": 1}
    (letter,) = dead_letters(sync_redis)
    assert letter["reason"] == "unknown_realm"
    assert letter["realm_id"] == "999"
    assert letter["verified_by"] == fingerprint("tok")
    assert json.loads(letter["payload"])["intuitaccountid"] == "999"
    assert events(sync_redis) == []


def test_unreadable_token_index_entries_are_skipped_not_a_503(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    # Another writer left bytes that are not UTF-8 in the index (a value, and a field name): the entries are
    # unusable, the readable one still recognises the delivery.
    register(sync_redis, "123", "tok")
    sync_redis.hset("qbo:verifier-tokens", fingerprint("tok"), orjson.dumps({"token": "tok", "last_seen": 9e9}))
    sync_redis.hset("qbo:verifier-tokens", "garbled-value", b'{"token": "\xff\xfe", "last_seen": 9e9}')
    sync_redis.hset("qbo:verifier-tokens", b"\xff-name", orjson.dumps({"token": "other", "last_seen": 9e9}))
    response = post(client, ce_body("999"), "tok")
    assert response.status_code == 200
    assert [letter["reason"] for letter in dead_letters(sync_redis)] == ["unknown_realm"]


def test_realm_without_token_is_dead_lettered_as_unknown(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "tok")
    register(sync_redis, "456", None)
    body = orjson.dumps(json.loads(ce_body("123")) + json.loads(ce_body("456")))
    assert post(client, body, "tok").json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 1}
    assert [letter["reason"] for letter in dead_letters(sync_redis)] == ["unknown_realm"]


def test_removed_connection_is_still_recognised_and_dead_lettered(
    client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "tok")
    with client_factory():
        pass  # the start-up rebuild records every registered token in the index
    assert sync_redis.hlen("qbo:verifier-tokens") == 1
    sync_redis.delete("qbo:connection:123")
    with client_factory() as client:
        response = post(client, ce_body("123"), "tok")
    assert response.status_code == 200
    assert [letter["reason"] for letter in dead_letters(sync_redis)] == ["unknown_realm"]


def test_unknown_realm_with_unknown_token_is_401(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    assert post(client, ce_body("999"), "nobody-knows-me").status_code == 401
    assert sync_redis.xlen("qbo:events:dead") == 0


def test_cross_tenant_injection_is_refused(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    """Tenant A knows its own token and tries to inject events for tenant B."""
    register(sync_redis, "111", "token-a")
    register(sync_redis, "222", "token-b")
    # B alone, signed with A's token: B's token is the only candidate, so 401.
    assert post(client, ce_body("222"), "token-a").status_code == 401
    # Mixed into a batch A may send: A's events are accepted, B's are dead-lettered, nothing queued for B.
    mixed = orjson.dumps(json.loads(ce_body("111")) + json.loads(ce_body("222", "9")))
    assert post(client, mixed, "token-a").json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 1}
    assert {e["realm_id"] for e in events(sync_redis)} == {"111"}
    (letter,) = dead_letters(sync_redis)
    assert (letter["reason"], letter["realm_id"], letter["verified_by"]) == (
        "token_mismatch",
        "222",
        fingerprint("token-a"),
    )


def test_app_level_token_dead_letters_instead_of_queueing(
    client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "111", "token-a")
    with client_factory(app_verifier_tokens="portal-token") as client:
        response = post(client, ce_body("111"), "portal-token")
    assert response.json() == {"accepted": 0, "duplicates": 0, "dead_lettered": 1}
    assert dead_letters(sync_redis)[0]["reason"] == "token_mismatch"


@pytest.mark.parametrize(
    "element",
    [
        pytest.param("not an object", id="not-object"),
        pytest.param({"type": "qbo.customer.updated.v1", "intuitaccountid": "111"}, id="no-entity-id"),
        pytest.param({"type": "qbo.customer.updated.v1", "intuitentityid": "1"}, id="no-realm"),
        pytest.param({"type": "bogus", "intuitentityid": "1", "intuitaccountid": "111"}, id="bad-type"),
        pytest.param(
            {"type": "qbo.customer.updated.v1", "intuitentityid": "1", "intuitaccountid": "x1"}, id="non-digit-realm"
        ),
    ],
)
def test_invalid_events_are_dead_lettered(element: object, client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "111", "tok")
    body = orjson.dumps([element, *json.loads(ce_body("111"))])
    assert post(client, body, "tok").json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 1}
    (letter,) = dead_letters(sync_redis)
    assert letter["reason"] == "invalid_event"
    assert letter["payload"] == orjson.dumps(element).decode()


@pytest.mark.parametrize(
    ("body", "encoding"),
    [(b"this is not json", None), (b"\xff\xfe\x00garbage", "base64"), (b'{"some":"object"}', None)],
    ids=["text", "binary", "other-object"],
)
def test_unparseable_authentic_body_is_one_dead_letter_with_the_raw_body(
    body: bytes, encoding: str | None, client: TestClient, sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "111", "tok")
    sync_redis.hset("qbo:verifier-tokens", fingerprint("tok"), orjson.dumps({"token": "tok", "last_seen": 9e9}))
    assert post(client, body, "tok").json() == {"accepted": 0, "duplicates": 0, "dead_lettered": 1}
    (letter,) = dead_letters(sync_redis)
    assert letter["reason"] == "unparseable"
    assert letter.get("encoding") == encoding
    raw = base64.b64decode(letter["payload"]) if encoding else letter["payload"].encode()
    assert raw == body


def test_unparseable_unauthentic_body_is_401(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    assert post(client, b"garbage", "tok").status_code == 401
    assert sync_redis.dbsize() == 0


def test_token_rotation_takes_effect_without_restart(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "123", "old-token")
    assert post(client, ce_body("123", "1"), "old-token").status_code == 200  # now cached
    register(sync_redis, "123", "new-token")
    assert post(client, ce_body("123", "2"), "new-token").status_code == 200  # re-read before refusing
    assert len(events(sync_redis)) == 2


def test_removed_token_stops_verifying_within_the_cache_time(
    client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    register(sync_redis, "123", "old-token")
    with client_factory(connection_cache_seconds=0) as client:
        assert post(client, ce_body("123", "1"), "old-token").status_code == 200
        register(sync_redis, "123", "new-token")
        assert post(client, ce_body("123", "2"), "old-token").status_code == 401


def test_new_connection_works_at_once(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    register(sync_redis, "1", "tok")
    sync_redis.hset("qbo:verifier-tokens", fingerprint("tok"), orjson.dumps({"token": "tok", "last_seen": 9e9}))
    assert post(client, ce_body("555"), "tok").json()["dead_lettered"] == 1  # 555 is now cached as unknown
    register(sync_redis, "555", "tok")
    assert post(client, ce_body("555", "2"), "tok").json()["accepted"] == 1


def test_connection_stored_as_json_string_is_read(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    sync_redis.set(
        "qbo:connection:777",
        json.dumps({"realm_id": "777", "webhook_verifier_token": "tok", "environment": "production"}),
    )
    assert post(client, ce_body("777"), "tok").json()["accepted"] == 1
    assert events(sync_redis)[0]["environment"] == "production"


def test_undecryptable_token_is_unusable_not_a_500(
    client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    sync_redis.hset("qbo:connection:123", mapping={"realm_id": "123", "webhook_verifier_token": "enc:v1:garbage"})
    with client_factory() as client:
        assert post(client, ce_body("123"), "tok").status_code == 401
    assert events(sync_redis) == []


def test_bytes_that_are_not_utf8_cost_only_their_own_realm(client: TestClient, sync_redis: redis_sync.Redis) -> None:
    """A connection another writer stored with bytes that are not UTF-8: never a 503 (Intuit would retry for
    ever); the bad value is unusable, the rest of the connection and every other realm work as usual."""
    register(sync_redis, "111", "tok")
    sync_redis.hset("qbo:connection:222", mapping={"webhook_verifier_token": "tok", "environment": b"produc\xe9ion"})
    sync_redis.hset("qbo:connection:333", mapping={"webhook_verifier_token": b"t\xffk"})
    response = post(client, ce_body("222", "1") + b"", "tok")
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 1
    assert events(sync_redis)[-1]["environment"] == ""  # unreadable, so empty
    mixed = orjson.dumps([orjson.loads(ce_body("111", "2"))[0], orjson.loads(ce_body("333", "3"))[0]])
    response = post(client, mixed, "tok")
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0, "dead_lettered": 1}
    assert dead_letters(sync_redis)[-1]["reason"] == "unknown_realm"  # 333's token is unusable


def test_secrets_never_reach_stream_entries_or_logs(
    client: TestClient, sync_redis: redis_sync.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    secrets: dict[Any, Any] = {
        "webhook_verifier_token": "verifier-SECRET-1",
        "client_secret": "client-SECRET-2",
        "refresh_token": "refresh-SECRET-3",
        "access_token": "access-SECRET-4",
    }
    sync_redis.hset("qbo:connection:123", mapping={"realm_id": "123", **secrets})
    caplog.set_level(logging.DEBUG)
    body = ce_body("123")
    signature = sign(secrets["webhook_verifier_token"], body)
    assert client.post(WEBHOOK, content=body, headers={"intuit-signature": signature}).status_code == 200
    assert post(client, body, "wrong").status_code == 401
    dumped = json.dumps([events(sync_redis), dead_letters(sync_redis)]) + caplog.text
    for value in [*secrets.values(), signature]:
        assert value not in dumped
    assert "status=200" in caplog.text


def test_large_forged_bodies_cannot_buy_unbounded_hashing(
    client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    """Bodies naming no registered realm are checked against every known token; that work stops at the budget."""
    for n in range(400):
        token = f"tenant-token-{n}"
        sync_redis.hset("qbo:verifier-tokens", fingerprint(token), orjson.dumps({"token": token, "last_seen": 9e9}))
    body = b'{"eventNotifications":[' + b" " * (5 * 1024 * 1024 - 100) + b"]}"  # about 2 GB of HMAC input in all
    with client_factory(response_budget_seconds=0.2) as client:
        response = post(client, body, "not-a-known-token")
        time.sleep(0.3)
        cpu = time.process_time()
        time.sleep(1.0)
        busy = time.process_time() - cpu
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert busy < 0.5  # no thread is still hashing the body after the answer (all of it takes seconds)
    assert sync_redis.xlen("qbo:events") == 0
    assert sync_redis.xlen("qbo:events:dead") == 0


async def _delete_connection(redis_url: str, realm_id: str) -> None:
    from redis.asyncio import Redis

    from service.connections import ConnectionStore
    from service.crypto import SecretBox
    from service.keys import Keys

    client = Redis.from_url(redis_url, decode_responses=True)
    await ConnectionStore(client, Keys(), SecretBox()).delete(realm_id)
    await client.aclose()


def test_a_connection_deleted_with_the_cli_stops_verifying_at_once(
    client: TestClient, sync_redis: redis_sync.Redis, redis_url: str
) -> None:
    register(sync_redis, "123", "tok")
    assert post(client, ce_body("123", "1"), "tok").json()["accepted"] == 1  # now cached for 10 s
    time.sleep(0.3)  # the service's subscription is up by now (it subscribes at start-up)
    asyncio.run(_delete_connection(redis_url, "123"))
    deadline = time.monotonic() + 2  # the announcement is asynchronous; well under the 10 s cache time
    while True:
        outcome = post(client, ce_body("123", "2"), "tok").json()
        if outcome["accepted"] == 0:
            break
        assert time.monotonic() < deadline, "the deleted connection still verified"
        sync_redis.delete("qbo:seen:" + events(sync_redis)[-1]["event_id"])
        sync_redis.xtrim("qbo:events", maxlen=1)
    assert outcome == {"accepted": 0, "duplicates": 0, "dead_lettered": 1}
    assert dead_letters(sync_redis)[-1]["reason"] == "unknown_realm"
