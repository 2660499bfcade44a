"""Dead-letter operations against a real Redis and the real receiver (SPEC §5.4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis as redis_sync
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from service.connections import ConnectionStore
from service.consumer import Consumer
from service.crypto import SecretBox
from service.deadletters import DeadLetters, Letter, event_from_letter
from service.entries import StreamEvent
from service.keys import Keys
from service.models import ConnectionMetadata, Event
from service.payloads import parse_body
from service.signature import fingerprint
from tests.helpers import dead_letters, entries, events, post, register
from tests.stream_helpers import DEAD, EVENTS, add_events, eventually, pending_count

REALM = "9130350000000077"
APP_TOKEN = "app-token-that-verified-the-delivery"
OTHER_TOKEN = "another-apps-token"


def delivery(fmt: str, realm_id: str = REALM, entity_id: str = "42") -> bytes:
    if fmt == "legacy":
        entity = {"name": "Invoice", "id": entity_id, "operation": "Update", "lastUpdated": "2026-03-01T10:00:00-0700"}
        return orjson.dumps({"eventNotifications": [{"realmId": realm_id, "dataChangeEvent": {"entities": [entity]}}]})
    event = {
        "specversion": "1.0",
        "id": f"ce-{entity_id}",
        "source": "intuit.test",
        "type": "qbo.invoice.updated.v1",
        "time": "2026-03-01T17:00:00.123456Z",
        "intuitentityid": entity_id,
        "intuitaccountid": realm_id,
        "data": {"note": "ünïcode"},
    }
    return orjson.dumps([event])


def deliver_unknown_realm(client_factory: Callable[..., Any], body: bytes) -> None:
    """POST through the receiver: authentic (the app token verifies) but the realm is not registered."""
    with client_factory(app_verifier_tokens=APP_TOKEN) as client:
        assert post(client, body, APP_TOKEN).json() == {"accepted": 0, "duplicates": 0, "dead_lettered": 1}


def dead_letter_store(redis: Redis, keys: tuple[str, ...] = ()) -> DeadLetters:
    return DeadLetters(redis, Keys(), ConnectionStore(redis, Keys(), SecretBox(keys)), dedupe_ttl_seconds=3600)


@pytest.mark.parametrize("fmt", ["cloudevents", "legacy"])
async def test_unknown_realm_letter_is_queued_once_after_the_realm_is_registered(
    client_factory: Callable[..., Any], redis: Redis, sync_redis: redis_sync.Redis, fmt: str
) -> None:
    body = delivery(fmt)
    deliver_unknown_realm(client_factory, body)
    (letter,) = dead_letters(sync_redis)
    assert (letter["reason"], letter["verified_by"]) == ("unknown_realm", fingerprint(APP_TOKEN))
    letters = dead_letter_store(redis)

    (refused,) = await letters.replay_matching("unknown_realm")
    assert (refused.status, refused.detail) == ("refused", f"realm {REALM} is not registered")
    assert len(dead_letters(sync_redis)) == 1

    register(sync_redis, REALM, APP_TOKEN, "production")
    (outcome,) = await letters.replay_matching("unknown_realm")
    assert outcome.status == "queued"
    assert await letters.replay_matching("unknown_realm") == []  # the letter is gone: a second run queues nothing
    (entry,) = events(sync_redis)
    (expected,) = parse_body(body).items
    assert isinstance(expected, Event)
    assert outcome.entry_id == entries(sync_redis, EVENTS)[0][0]
    assert entry["event_id"] == expected.event_id
    assert entry["payload"] == expected.payload
    assert (entry["realm_id"], entry["environment"], entry["format"]) == (REALM, "production", fmt)
    assert entry["received_at"] == letter["received_at"]
    assert dead_letters(sync_redis) == []
    assert sync_redis.exists(f"qbo:seen:{expected.event_id}")


async def test_concurrent_replays_of_one_letter_queue_it_once(
    client_factory: Callable[..., Any], redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    deliver_unknown_realm(client_factory, delivery("cloudevents"))
    register(sync_redis, REALM, APP_TOKEN)
    (letter_id, _), *_ = entries(sync_redis, DEAD)
    results = await asyncio.gather(*(dead_letter_store(redis).replay_matching(letter_id=letter_id) for _ in range(4)))
    statuses = sorted(outcome.status for (outcome,) in results)
    assert statuses == ["gone", "gone", "gone", "queued"]
    assert len(events(sync_redis)) == 1


async def test_replay_of_an_event_queued_meanwhile_goes_through_dedupe(
    client_factory: Callable[..., Any], redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    body = delivery("cloudevents")
    deliver_unknown_realm(client_factory, body)
    register(sync_redis, REALM, APP_TOKEN)
    with client_factory() as client:  # Intuit retried the delivery after the realm was registered
        assert post(client, body, APP_TOKEN).json()["accepted"] == 1
    (outcome,) = await dead_letter_store(redis).replay_matching("unknown_realm")
    assert outcome.status == "duplicate"
    assert len(events(sync_redis)) == 1
    assert dead_letters(sync_redis) == []


@pytest.mark.parametrize("registered_token", [OTHER_TOKEN, None], ids=["other-token", "no-token"])
async def test_replay_is_refused_unless_the_registered_token_is_the_one_that_verified(
    client_factory: Callable[..., Any], redis: Redis, sync_redis: redis_sync.Redis, registered_token: str | None
) -> None:
    deliver_unknown_realm(client_factory, delivery("cloudevents"))
    register(sync_redis, REALM, registered_token)
    (outcome,) = await dead_letter_store(redis).replay_matching("unknown_realm")
    assert outcome.status == "refused"
    if registered_token:
        assert fingerprint(OTHER_TOKEN) in outcome.detail
        assert fingerprint(APP_TOKEN) in outcome.detail
        assert OTHER_TOKEN not in outcome.detail
    else:
        assert "no verifier token" in outcome.detail
    assert events(sync_redis) == []
    assert len(dead_letters(sync_redis)) == 1


async def test_replay_reads_an_encrypted_token(
    client_factory: Callable[..., Any], redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    key = Fernet.generate_key().decode()
    deliver_unknown_realm(client_factory, delivery("legacy"))
    store = ConnectionStore(redis, Keys(), SecretBox([key]))
    await store.put(ConnectionMetadata(realm_id=REALM, webhook_verifier_token=APP_TOKEN, environment="sandbox"))
    assert str(sync_redis.hget(f"qbo:connection:{REALM}", "webhook_verifier_token")).startswith("enc:v1:")
    (refused,) = await dead_letter_store(redis, (Fernet.generate_key().decode(),)).replay_matching("unknown_realm")
    assert (refused.status, refused.detail) == (
        "refused",
        f"realm {REALM}'s verifier token cannot be decrypted (QBO_ENCRYPTION_KEYS)",
    )
    (outcome,) = await dead_letter_store(redis, (key,)).replay_matching("unknown_realm")
    assert outcome.status == "queued"


async def test_handler_failed_letter_is_redelivered_to_the_group_with_the_same_event_id(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    (entry_id,) = add_events(sync_redis, 1)
    original = entries(sync_redis, EVENTS)[0][1]
    seen: list[StreamEvent] = []

    async def fail(event: StreamEvent) -> None:
        raise RuntimeError("downstream is down")

    worker = Consumer(redis, group="billing", max_deliveries=1, block=0.05)
    async with worker:
        task = asyncio.create_task(worker.process(fail))
        await eventually(lambda: sync_redis.xlen(DEAD) == 1)
        worker.stop()
        await task
    assert pending_count(sync_redis, "billing") == 0

    (outcome,) = await DeadLetters(redis, Keys()).replay_matching("handler_failed")
    assert outcome.status == "redelivered"
    assert dead_letters(sync_redis) == []
    new_id, replayed = entries(sync_redis, EVENTS)[-1]
    assert new_id == outcome.entry_id != entry_id
    assert replayed == original  # the original entry, field for field

    async def record(event: StreamEvent) -> None:
        seen.append(event)

    worker = Consumer(redis, group="billing", block=0.05)
    async with worker:
        task = asyncio.create_task(worker.process(record))
        await eventually(lambda: len(seen) == 1 and pending_count(sync_redis, "billing") == 0)
        worker.stop()
        await task
    assert (seen[0].entry_id, seen[0].event_id) == (new_id, original["event_id"])


@pytest.mark.parametrize("reason", ["token_mismatch", "invalid_event", "unparseable"])
async def test_other_reasons_are_never_replayed(redis: Redis, sync_redis: redis_sync.Redis, reason: str) -> None:
    payload = delivery("cloudevents").decode()
    sync_redis.xadd(DEAD, {"v": "1", "reason": reason, "realm_id": REALM, "verified_by": "x", "payload": payload})
    register(sync_redis, REALM, APP_TOKEN)
    letters = dead_letter_store(redis)
    assert await letters.replay_matching() == []  # "everything replayable" does not include them
    (outcome,) = await letters.replay_matching(reason)
    assert outcome.status == "refused"
    assert "never replayed" in outcome.detail
    assert len(dead_letters(sync_redis)) == 1
    assert events(sync_redis) == []


async def test_list_filters_by_reason_and_purge_deletes_only_what_was_selected(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    for reason in ("unparseable", "token_mismatch", "unparseable"):
        sync_redis.xadd(DEAD, {"v": "1", "reason": reason, "payload": "x"})
    letters = DeadLetters(redis, Keys())
    assert [letter.reason for letter in await letters.list_letters()] == [
        "unparseable",
        "token_mismatch",
        "unparseable",
    ]
    assert len(await letters.list_letters("unparseable", count=1)) == 1
    assert await letters.counts() == {"token_mismatch": 1, "unparseable": 2}
    selected = await letters.list_letters("unparseable")
    assert await letters.purge(letter.id for letter in selected) == 2
    assert [letter["reason"] for letter in dead_letters(sync_redis)] == ["token_mismatch"]


@pytest.mark.parametrize(
    ("payload", "expected_entity_id"),
    [
        ('{"name":"Bill","id":"7","operation":"Create","lastUpdated":"2026-03-01T10:00:00Z"}', "7"),
        (delivery("cloudevents", entity_id="0042").decode()[1:-1], "0042"),
        ("not json", None),
        ('{"name":"Bill"}', None),
    ],
    ids=["legacy-entity", "cloudevent", "not-json", "incomplete"],
)
def test_event_from_letter_rebuilds_either_format(payload: str, expected_entity_id: str | None) -> None:
    event = event_from_letter(REALM, payload)
    assert (event.entity_id if event else None) == expected_entity_id
    if event is not None:
        assert event.realm_id == REALM
        assert event.payload == payload


def test_letter_view() -> None:
    letter = Letter("1-0", {"reason": "unparseable", "payload": "x"})
    assert letter.as_dict() == {"id": "1-0", "reason": "unparseable", "payload": "x"}
