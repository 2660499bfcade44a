"""Connection metadata store, encryption at rest and the route cache, against a real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis as redis_sync
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from service.connections import ConnectionStore
from service.crypto import PREFIX, SecretBox
from service.errors import DecryptionError, EncryptionRequired
from service.keys import Keys
from service.models import ConnectionMetadata
from service.signature import fingerprint
from tests.helpers import hash_of

KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(redis: Redis, *keys: str, clock: Clock | None = None, cache: float = 10.0) -> ConnectionStore:
    return ConnectionStore(redis, Keys(), SecretBox(keys), cache_seconds=cache, clock=clock or Clock())


def test_metadata_has_exactly_the_seed_fields_and_masks_secrets() -> None:
    assert set(ConnectionMetadata.field_names()) == {
        "access_token",
        "auth_code",
        "client_id",
        "client_secret",
        "environment",
        "income_account_id",
        "oauth_session_data",
        "realm_id",
        "redirect_uri",
        "refresh_token",
        "webhook_verifier_token",
    }
    metadata = ConnectionMetadata(realm_id="1", client_secret="cs-value", webhook_verifier_token="vt-value")
    for text in (repr(metadata), str(metadata), f"{metadata}", repr([metadata])):
        assert "cs-value" not in text
        assert "vt-value" not in text
        assert "realm_id='1'" in text


def test_secret_box_rotation() -> None:
    old = SecretBox([KEY_A])
    both = SecretBox([KEY_B, KEY_A])
    stored = old.encrypt("s3cret")
    assert stored.startswith(PREFIX)
    assert "s3cret" not in stored
    assert both.decrypt(stored) == "s3cret"
    assert not both.is_current(stored)
    rotated = both.rotate(stored)
    assert both.is_current(rotated)
    assert SecretBox([KEY_B]).decrypt(rotated) == "s3cret"
    with pytest.raises(DecryptionError):
        SecretBox([KEY_A]).decrypt(rotated)
    with pytest.raises(DecryptionError):
        SecretBox().decrypt(rotated)
    assert SecretBox().encrypt("plain") == "plain"


async def test_put_encrypts_secrets_and_get_decrypts(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    s = store(redis, KEY_A)
    await s.put(
        ConnectionMetadata(
            realm_id="42", webhook_verifier_token="vt", client_secret="cs", client_id="ci", environment="production"
        )
    )
    raw = hash_of(sync_redis, "qbo:connection:42")
    assert raw["client_id"] == "ci"
    assert raw["realm_id"] == "42"
    assert raw["client_secret"].startswith(PREFIX)
    assert raw["webhook_verifier_token"].startswith(PREFIX)
    got = await s.get("42")
    assert got is not None
    assert (got.client_secret, got.webhook_verifier_token, got.environment) == ("cs", "vt", "production")


async def test_put_merges_fields_and_refuses_plaintext_secrets(redis: Redis) -> None:
    s = store(redis)
    await s.put(ConnectionMetadata(realm_id="42", webhook_verifier_token="vt", environment="sandbox"))
    with pytest.raises(EncryptionRequired):
        await s.put(ConnectionMetadata(realm_id="42", refresh_token="rt"))
    await s.put(ConnectionMetadata(realm_id="42", refresh_token="rt"), allow_plaintext=True)
    got = await s.get("42")
    assert got is not None
    assert (got.webhook_verifier_token, got.refresh_token, got.environment) == ("vt", "rt", "sandbox")


async def test_routes_cache_and_single_round_trip(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    clock = Clock()
    s = store(redis, clock=clock)
    sync_redis.hset("qbo:connection:1", mapping={"webhook_verifier_token": "t1", "environment": "sandbox"})
    sync_redis.set("qbo:connection:2", json.dumps({"webhook_verifier_token": "t2", "environment": "production"}))
    await s.preload()
    sync_redis.config_resetstat()
    routes, cached = await s.routes(["1", "2", "3"])
    assert cached == set()
    assert routes["1"] is not None
    assert routes["1"].token == "t1"
    assert routes["2"] is not None
    assert routes["2"].environment == "production"
    assert routes["3"] is None
    stats = sync_redis.info("commandstats")
    assert sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")) == 1
    _, cached = await s.routes(["1", "2", "3"])
    assert cached == {"1", "2", "3"}
    clock.now += 2.5  # the negative entry (unknown realm 3) expires after 2 s, the others after 10 s
    _, cached = await s.routes(["1", "2", "3"])
    assert cached == {"1", "2"}
    clock.now += 10
    _, cached = await s.routes(["1"])
    assert cached == set()


async def test_undecryptable_token_is_unusable_and_counted(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    stored = SecretBox([KEY_A]).encrypt("vt")
    sync_redis.hset("qbo:connection:9", mapping={"webhook_verifier_token": stored})
    s = store(redis, KEY_B)
    routes, _ = await s.routes(["9"])
    assert routes["9"] is not None
    assert routes["9"].token is None
    assert s.decrypt_failures == 1


async def test_known_token_index_keeps_removed_tokens_for_the_retention(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    s = ConnectionStore(redis, Keys(), SecretBox([KEY_A]), retired_token_days=30)
    await s.put(ConnectionMetadata(realm_id="1", webhook_verifier_token="tok-1"))
    await s.put(ConnectionMetadata(realm_id="2", webhook_verifier_token="tok-2"))
    assert set(await s.known_tokens()) == {"tok-1", "tok-2"}
    raw = sync_redis.hget("qbo:verifier-tokens", fingerprint("tok-1"))
    assert raw is not None
    assert "tok-1" not in raw
    assert await s.delete("2")
    assert set(await s.known_tokens()) == {"tok-1", "tok-2"}  # removed, but still recognised
    # Age tok-2 past the retention: a rebuild prunes it; tok-1 is refreshed by its connection.
    sync_redis.hset("qbo:verifier-tokens", fingerprint("tok-2"), json.dumps({"token": "tok-2", "last_seen": 1}))
    assert await s.rebuild_token_index() == 1
    assert set(await s.known_tokens()) == {"tok-1"}


async def test_rebuild_finds_connections_written_by_others(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    sync_redis.hset("qbo:connection:5", mapping={"realm_id": "5", "webhook_verifier_token": "theirs"})
    sync_redis.set("qbo:connection:6", json.dumps({"realm_id": "6", "webhook_verifier_token": "json-writer"}))
    s = store(redis)
    assert await s.rebuild_token_index() == 2
    assert set(await s.known_tokens()) == {"theirs", "json-writer"}
    assert await s.realm_ids() == ["5", "6"]


async def test_put_never_loses_a_change_another_writer_makes_while_it_runs(
    redis: Redis, sync_redis: redis_sync.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_redis.hset("qbo:connection:31", mapping={"webhook_verifier_token": "tok-31"})
    s = store(redis)
    read = s._read_raw
    reads = 0

    async def read_then_another_writer_writes(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        result = await read(*args)
        if reads == 1:  # between our read and our write
            sync_redis.hset("qbo:connection:31", "income_account_id", "theirs")
        return result

    monkeypatch.setattr(s, "_read_raw", read_then_another_writer_writes)
    await s.put(ConnectionMetadata(realm_id="31", environment="production"))
    assert reads == 2  # read again after the other writer's change
    assert sync_redis.hgetall("qbo:connection:31") == {
        "webhook_verifier_token": "tok-31",
        "income_account_id": "theirs",
        "environment": "production",
        "realm_id": "31",
    }


async def test_a_key_name_that_is_not_utf8_does_not_stop_scans(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    sync_redis.hset(b"qbo:connection:\xff", mapping={"webhook_verifier_token": "bad-key"})  # another writer's
    sync_redis.hset("qbo:connection:5", mapping={"webhook_verifier_token": "tok-5"})
    s = store(redis)
    assert await s.realm_ids() == ["5"]
    assert await s.rebuild_token_index() == 1
    assert set(await s.known_tokens()) == {"tok-5"}


async def test_rebuild_removes_index_entries_that_are_not_utf8(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    sync_redis.hset("qbo:connection:5", mapping={"webhook_verifier_token": "tok-5"})
    sync_redis.hset("qbo:verifier-tokens", "garbled", b'{"token": "\xff", "last_seen": 9e9}')
    sync_redis.hset("qbo:verifier-tokens", b"\xfe", json.dumps({"token": "x", "last_seen": 9e9}))
    s = store(redis)
    assert await s.rebuild_token_index() == 1
    assert set(await s.known_tokens()) == {"tok-5"}
    assert sync_redis.hkeys("qbo:verifier-tokens") == [fingerprint("tok-5")]


async def test_a_token_no_key_decrypts_never_enters_the_index(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    stranger = Fernet.generate_key().decode()
    await store(redis, stranger).put(ConnectionMetadata(realm_id="9", webhook_verifier_token="theirs-9"))
    sync_redis.delete("qbo:verifier-tokens")
    s = store(redis, Fernet.generate_key().decode())  # this CLI's key does not open the stored token
    await s.put(ConnectionMetadata(realm_id="9", environment="production"))
    await s.delete("9")
    assert sync_redis.hgetall("qbo:verifier-tokens") == {}


async def test_rebuild_is_not_stopped_by_a_field_that_is_not_utf8(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    """Another writer's binary session blob in one connection: every token is still indexed (SPEC §4.4)."""
    sync_redis.hset("qbo:connection:5", mapping={"webhook_verifier_token": "tok-5", "oauth_session_data": b"\x80\x04"})
    sync_redis.hset("qbo:connection:6", mapping={"webhook_verifier_token": "tok-6"})
    sync_redis.hset("qbo:connection:7", mapping={"webhook_verifier_token": b"\xff\xfe"})  # unusable: skipped
    s = store(redis)
    assert await s.rebuild_token_index() == 2
    assert set(await s.known_tokens()) == {"tok-5", "tok-6"}


async def test_a_burst_of_cache_misses_waits_for_connections(redis_url: str, sync_redis: redis_sync.Redis) -> None:
    """More concurrent misses than pooled connections: they queue for a connection instead of failing."""
    import asyncio

    from service.client import make_redis

    for n in range(300):
        sync_redis.hset(f"qbo:connection:{n}", mapping={"webhook_verifier_token": f"t{n}"})
    client = make_redis(redis_url, timeout=5.0)  # the service's pool: 64 connections
    s = store(client)
    results = await asyncio.gather(*(s.routes([str(n)]) for n in range(300)))
    assert all(routes[str(n)] is not None for n, (routes, _) in enumerate(results))
    await client.aclose()
