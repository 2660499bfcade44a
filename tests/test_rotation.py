"""``qbo-webhooks keys generate|rotate`` and the Rotator: secrets re-encrypted under the first key, safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis as redis_sync
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from redis.client import NEVER_DECODE

from service.connections import ConnectionStore
from service.crypto import SecretBox
from service.errors import ConfigurationError
from service.keys import Keys
from service.models import ENCRYPTED_FIELDS, ConnectionMetadata
from service.rotation import Rotator
from service.signature import fingerprint
from tests.helpers import post
from tests.procs import free_port

OLD, NEW, STRANGER = (Fernet.generate_key().decode() for _ in range(3))
SECRETS = {
    "webhook_verifier_token": "rot-verifier-1",
    "client_secret": "rot-client-secret-2",
    "refresh_token": "rot-refresh-3",
    "access_token": "rot-access-4",
}


async def seed(redis: Redis, realms: int = 3) -> None:
    store = ConnectionStore(redis, Keys(), SecretBox([OLD]))
    for n in range(realms):
        values = {name: f"{value}-{n}" for name, value in SECRETS.items()}
        await store.put(ConnectionMetadata(realm_id=str(100 + n), environment="sandbox", **values))


def stored_secrets(r: redis_sync.Redis) -> list[str]:
    values: list[str] = []
    for key in r.scan_iter("qbo:connection:*"):
        values += [str(v) for k, v in r.hgetall(key).items() if k in ENCRYPTED_FIELDS]
    values += [orjson.loads(v)["token"] for v in r.hgetall("qbo:verifier-tokens").values()]
    return values


def raw_field(r: redis_sync.Redis, key: str, name: str) -> object:
    return r.execute_command("HGET", key, name, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]


async def test_values_that_are_not_utf8_do_not_stop_the_rotation(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    await seed(redis, realms=2)
    sync_redis.hset("qbo:connection:100", "oauth_session_data", b"\x80\x04\xff")  # another writer's binary blob
    sync_redis.hset("qbo:connection:101", "access_token", b"\xff\xfe")  # a secret that is not even text
    sync_redis.set("qbo:connection:102", b'{"webhook_verifier_token":"\xff"}')  # a JSON string that is not UTF-8
    sync_redis.hset(b"qbo:connection:\xfe", "client_secret", "x")  # a key name that is not UTF-8: skipped

    report = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()

    assert (report.connections, report.rotated, report.undecryptable, report.conflicts) == (3, 7, 1, 0)
    assert report.unreadable == 2  # the JSON string and the key name: what they hold was not checked
    assert not report.complete
    assert raw_field(sync_redis, "qbo:connection:100", "oauth_session_data") == b"\x80\x04\xff"
    assert raw_field(sync_redis, "qbo:connection:101", "access_token") == b"\xff\xfe"
    new_only = SecretBox([NEW])
    assert new_only.decrypt(str(sync_redis.hget("qbo:connection:100", "access_token"))) == "rot-access-4-0"
    assert new_only.decrypt(str(sync_redis.hget("qbo:connection:101", "client_secret"))) == "rot-client-secret-2-1"


async def test_index_entries_that_are_not_utf8_do_not_stop_the_rotation(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    await seed(redis, realms=1)
    sync_redis.hset("qbo:verifier-tokens", "garbled", b'{"token": "\xff", "last_seen": 9e9}')  # another writer's

    report = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()

    assert (report.index_rotated, report.unreadable, report.undecryptable, report.conflicts) == (1, 1, 0, 0)
    assert not report.complete  # what the garbled entry holds was not checked
    assert raw_field(sync_redis, "qbo:verifier-tokens", "garbled") == b'{"token": "\xff", "last_seen": 9e9}'
    entry = orjson.loads(str(sync_redis.hget("qbo:verifier-tokens", fingerprint("rot-verifier-1-0"))))
    assert SecretBox([NEW]).decrypt(entry["token"]) == "rot-verifier-1-0"


async def test_an_index_entry_with_an_empty_name_is_rotated(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    # Another writer's entry under the field name "": a hash field like any other, not "the key is a string".
    old_token = SecretBox([OLD]).encrypt("theirs")
    sync_redis.hset("qbo:verifier-tokens", "", orjson.dumps({"token": old_token, "last_seen": 9e9}))

    report = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()

    assert (report.index_rotated, report.conflicts) == (1, 0)
    assert report.complete
    entry = orjson.loads(str(sync_redis.hget("qbo:verifier-tokens", "")))
    assert SecretBox([NEW]).decrypt(entry["token"]) == "theirs"


async def test_rotate_moves_every_secret_to_the_first_key(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    await seed(redis)
    assert all(SecretBox([OLD]).is_current(v) for v in stored_secrets(sync_redis))

    report = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()

    assert (report.connections, report.rotated, report.current) == (3, 12, 0)
    assert (report.index_rotated, report.conflicts, report.undecryptable) == (3, 0, 0)
    new_only = SecretBox([NEW])
    assert all(new_only.is_current(v) for v in stored_secrets(sync_redis))
    store = ConnectionStore(redis, Keys(), new_only)  # the old key is no longer needed
    metadata = await store.get("101")
    assert metadata is not None
    assert {name: getattr(metadata, name) for name in SECRETS} == {k: f"{v}-1" for k, v in SECRETS.items()}
    assert sorted(await store.known_tokens()) == [f"rot-verifier-1-{n}" for n in range(3)]

    again = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()  # idempotent
    assert (again.rotated, again.index_rotated, again.current, again.index_current) == (0, 0, 12, 3)


async def test_an_interrupted_rotation_finishes_when_run_again(
    redis: Redis, sync_redis: redis_sync.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(redis)
    rotator = Rotator(redis, Keys(), SecretBox([NEW, OLD]))
    real_cas = rotator._cas
    calls = 0

    async def crash_after_five(key: str, name: str, old: str, new: str) -> bool:
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt  # the operator's Ctrl-C, mid-way
        return await real_cas(key, name, old, new)

    monkeypatch.setattr(rotator, "_cas", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        await rotator.run()
    # Half-rotated is a valid state: every value opens with one of the configured keys.
    both = SecretBox([NEW, OLD])
    assert sum(both.is_current(v) for v in stored_secrets(sync_redis)) == 5
    assert all(both.decrypt(v) for v in stored_secrets(sync_redis))

    report = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()
    assert (report.rotated + report.index_rotated, report.current, report.complete) == (10, 5, True)
    assert all(SecretBox([NEW]).is_current(v) for v in stored_secrets(sync_redis))


async def test_a_value_changed_meanwhile_is_not_overwritten(redis: Redis, sync_redis: redis_sync.Redis) -> None:
    await seed(redis, realms=1)
    rotator = Rotator(redis, Keys(), SecretBox([NEW, OLD]))
    stored = sync_redis.hget("qbo:connection:100", "refresh_token")
    assert isinstance(stored, str)
    sync_redis.hset("qbo:connection:100", "refresh_token", SecretBox([NEW]).encrypt("written-by-oauth-refresh"))
    assert await rotator._cas("qbo:connection:100", "refresh_token", stored, "would-clobber") is False
    assert SecretBox([NEW]).decrypt(str(sync_redis.hget("qbo:connection:100", "refresh_token"))) == (
        "written-by-oauth-refresh"
    )


async def test_undecryptable_and_foreign_plaintext_values_are_left_alone(
    redis: Redis, sync_redis: redis_sync.Redis
) -> None:
    stranger = SecretBox([STRANGER]).encrypt("nobody-can-open-this")
    sync_redis.hset("qbo:connection:7", mapping={"realm_id": "7", "client_secret": stranger})
    other_writer = {"realm_id": "8", "webhook_verifier_token": "plain-from-other-writer", "access_token": ""}
    other_writer["refresh_token"] = SecretBox([OLD]).encrypt("json-refresh")
    sync_redis.set("qbo:connection:8", json.dumps(other_writer))

    report = await Rotator(redis, Keys(), SecretBox([NEW, OLD])).run()

    assert (report.undecryptable, report.plaintext_left, report.rotated, report.complete) == (1, 1, 1, False)
    assert sync_redis.hget("qbo:connection:7", "client_secret") == stranger
    kept = json.loads(str(sync_redis.get("qbo:connection:8")))
    assert kept["webhook_verifier_token"] == "plain-from-other-writer"
    assert SecretBox([NEW]).decrypt(kept["refresh_token"]) == "json-refresh"


async def test_rotation_needs_a_key(redis: Redis) -> None:
    with pytest.raises(ConfigurationError):
        Rotator(redis, Keys(), SecretBox())


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QBO_")} | env
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, env=environment, timeout=60
    )


def test_keys_generate_prints_a_fernet_key() -> None:
    result = run_cli("keys", "generate")
    assert result.returncode == 0
    key = result.stdout.strip()
    Fernet(key)  # raises if it is not one
    assert run_cli("keys", "generate").stdout.strip() != key


async def test_keys_rotate_cli_reports_counts_and_the_receiver_works_with_the_new_key_alone(
    redis: Redis, redis_url: str, client_factory: Callable[..., Any], sync_redis: redis_sync.Redis
) -> None:
    await seed(redis, realms=2)
    result = run_cli("keys", "rotate", QBO_REDIS_URL=redis_url, QBO_ENCRYPTION_KEYS=f"{NEW},{OLD}")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert (counts["rotated"], counts["index_rotated"], counts["complete"]) == (8, 2, True)
    assert "rot-" not in result.stdout + result.stderr  # counts only, never a value

    no_key = run_cli("keys", "rotate", QBO_REDIS_URL=redis_url)
    assert no_key.returncode == 2
    assert "QBO_ENCRYPTION_KEYS" in no_key.stderr

    body = (
        b'[{"specversion":"1.0","id":"r1","type":"qbo.bill.created.v1","intuitentityid":"9","intuitaccountid":"100"}]'
    )
    with client_factory(encryption_keys=NEW) as client:
        assert post(client, body, "rot-verifier-1-0").json()["accepted"] == 1
    assert sync_redis.hexists("qbo:verifier-tokens", fingerprint("rot-verifier-1-0"))


def test_keys_rotate_without_redis_says_so_in_one_line() -> None:
    url = f"redis://rotator:SECRET-redis-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    result = run_cli("keys", "rotate", QBO_REDIS_URL=url, QBO_ENCRYPTION_KEYS=NEW)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "qbo-webhooks: key rotation interrupted, run it again: ConnectionError"
    )
    assert "Traceback" not in result.stderr
    assert "SECRET-redis-pw" not in result.stdout + result.stderr
