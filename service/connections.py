"""Connection metadata in Redis (SPEC §5.1): the store, its in-process cache, and the known-token index (§4.4)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Collection
from importlib import resources
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import NoScriptError, RedisError, WatchError

from service.client import scan_keys, text_hash
from service.crypto import SecretBox
from service.errors import DecryptionError, EncryptionRequired, StorageUnavailable, UnreadableConnection
from service.keys import Keys
from service.models import ENCRYPTED_FIELDS, MUST_ENCRYPT_FIELDS, ConnectionMetadata, RealmRoute
from service.signature import fingerprint

logger = logging.getLogger(__name__)

NEGATIVE_CACHE_SECONDS = 2.0  # SPEC §4.4: an unregistered realm is remembered for at most 2 s
# Cache misses read Redis at most this many at a time: a burst of misses (start-up, many realms expiring
# together) queues here, within each request's deadline, instead of exhausting the connection pool.
CONCURRENT_READS = 16
PUT_ATTEMPTS = 5  # reads and writes of one put, when other writers keep changing the connection in between


class ConnectionStore:
    """Reads and writes connection metadata; caches the routing part of it for the receiver.

    ``routes`` is the hot path: on a warm cache it touches no Redis; a miss costs one round trip
    for all realms of a request together.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        box: SecretBox,
        *,
        cache_seconds: float = 10.0,
        retired_token_days: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._box = box
        self._cache_seconds = cache_seconds
        self._negative_seconds = min(NEGATIVE_CACHE_SECONDS, cache_seconds)
        self._retired_seconds = retired_token_days * 86400
        self._clock = clock
        self._cache: dict[str, tuple[float, RealmRoute | None]] = {}
        self._load_routes = redis.register_script(_lua("load_routes.lua"))
        self._reads = asyncio.Semaphore(CONCURRENT_READS)
        self._known_tokens: tuple[str, ...] = ()
        self._known_tokens_expire = 0.0
        self.decrypt_failures = 0

    # -- the receiver's path -------------------------------------------------------------------------

    async def preload(self) -> None:
        """Load the Lua script now, so the first request does not pay a NOSCRIPT round trip."""
        await self._redis.script_load(self._load_routes.script)

    async def routes(
        self, realm_ids: Collection[str], *, refresh: bool = False
    ) -> tuple[dict[str, RealmRoute | None], set[str]]:
        """Routing data of each realm (``None``: not registered) and the realms that were served from cache.

        With ``refresh`` every realm is read from Redis, whatever the cache holds.
        """
        now = self._clock()
        found: dict[str, RealmRoute | None] = {}
        cached: set[str] = set()
        missing: list[str] = []
        for realm_id in realm_ids:
            entry = None if refresh else self._cache.get(realm_id)
            if entry is not None and entry[0] > now:
                found[realm_id] = entry[1]
                cached.add(realm_id)
            else:
                missing.append(realm_id)
        if missing:
            loaded = await self._read_routes(missing)
            now = self._clock()
            for realm_id, route in loaded.items():
                # Up to 20% shorter at random, so realms cached together do not all expire in the same instant.
                ttl = (self._cache_seconds if route is not None else self._negative_seconds) * (
                    1.0 - 0.2 * random.random()
                )
                if ttl > 0:
                    self._cache[realm_id] = (now + ttl, route)
                found[realm_id] = route
            if len(self._cache) > 100_000:
                self._evict(now)
        return found, cached

    def cached(self, realm_ids: Collection[str]) -> dict[str, RealmRoute] | None:
        """The cached routes of ``realm_ids`` when every one is cached, unexpired and has a token; else ``None``.

        The receiver's fast path: no Redis, no await. Anything else takes ``routes``.
        """
        now = self._clock()
        found: dict[str, RealmRoute] = {}
        for realm_id in realm_ids:
            entry = self._cache.get(realm_id)
            if entry is None or entry[0] <= now or entry[1] is None or not entry[1].token:
                return None
            found[realm_id] = entry[1]
        return found

    async def known_tokens(self) -> tuple[str, ...]:
        """Every distinct verifier token of registered connections, and of those removed within the retention.

        Held in process for the cache time; only bodies naming no realm with a usable token need it.
        """
        now = self._clock()
        if now >= self._known_tokens_expire:
            try:
                async with self._reads:
                    raw, _ = await text_hash(self._redis, self._keys.verifier_tokens)
            except RedisError as exc:
                raise StorageUnavailable(f"reading the verifier-token index failed: {type(exc).__name__}") from exc
            self._known_tokens = tuple(self._index_tokens(raw, time.time()))
            self._known_tokens_expire = now + max(self._cache_seconds, 1.0)
        return self._known_tokens

    def forget(self, realm_id: str | None = None) -> None:
        """Drop cached routes (one realm, or all) and the cached token index."""
        if realm_id is None:
            self._cache.clear()
        else:
            self._cache.pop(realm_id, None)
        self._known_tokens_expire = 0.0

    async def _read_routes(self, realm_ids: list[str]) -> dict[str, RealmRoute | None]:
        keys = [self._keys.connection(r) for r in realm_ids]
        try:
            async with self._reads:
                # Read as bytes and decoded value by value: one connection holding bytes that are not UTF-8
                # must cost only its own realm (read as unusable), never every delivery naming it (503s).
                try:
                    replies = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", self._load_routes.sha, len(keys), *keys, **{NEVER_DECODE: True}
                    )
                except NoScriptError:
                    await self._redis.script_load(self._load_routes.script)
                    replies = await self._redis.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", self._load_routes.sha, len(keys), *keys, **{NEVER_DECODE: True}
                    )
        except RedisError as exc:
            raise StorageUnavailable(f"reading connections failed: {type(exc).__name__}") from exc
        return {realm_id: self._route(realm_id, reply) for realm_id, reply in zip(realm_ids, replies, strict=True)}

    def _route(self, realm_id: str, reply: list[Any]) -> RealmRoute | None:
        kind = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if kind == "hash":
            stored_token = _text(realm_id, "webhook_verifier_token", reply[1])
            environment = _text(realm_id, "environment", reply[2])
        elif kind == "string":
            data = _json_object(reply[1])
            if data is None:
                logger.error("connection of realm %s is a string but not a JSON object; treated as missing", realm_id)
                return None
            stored_token, environment = data.get("webhook_verifier_token"), data.get("environment")
        else:
            return None
        return RealmRoute(
            realm_id=realm_id,
            token=self._usable_token(realm_id, stored_token),
            environment=environment if isinstance(environment, str) else "",
        )

    def _usable_token(self, realm_id: str, stored: object) -> str | None:
        if not isinstance(stored, str) or not stored:
            return None
        try:
            return self._box.decrypt(stored) or None
        except DecryptionError as exc:
            self.decrypt_failures += 1
            logger.error("verifier token of realm %s is unusable: %s", realm_id, exc)
            return None

    def _index_tokens(self, raw: dict[str, str], now: float) -> list[str]:
        tokens = []
        for fp, value in raw.items():
            data = _json_object(value)
            if data is None or _expired(value, now, self._retired_seconds):
                continue
            token = self._usable_token(f"(index {fp})", data.get("token"))
            if token:
                tokens.append(token)
        return tokens

    def _evict(self, now: float) -> None:
        for realm_id in [r for r, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[realm_id]

    # -- operators' path (CLI) -----------------------------------------------------------------------

    async def get(self, realm_id: str) -> ConnectionMetadata | None:
        """The stored metadata, decrypted; a secret no key opens is left in its stored form, and a value that is
        not UTF-8 text (another writer's) is left out (logged)."""
        _, data, _ = await self._read_raw(realm_id)
        return self._metadata(data)

    def _metadata(self, data: dict[str, object] | None) -> ConnectionMetadata | None:
        if data is None:
            return None
        plain: dict[str, object] = {}
        for name, value in data.items():
            if name in ENCRYPTED_FIELDS and isinstance(value, str):
                with contextlib.suppress(DecryptionError):  # shown in its stored form
                    value = self._box.decrypt(value)
            plain[name] = value
        return ConnectionMetadata.from_mapping(plain)

    async def put(self, metadata: ConnectionMetadata, *, allow_plaintext: bool = False) -> ConnectionMetadata:
        """Merge ``metadata`` into the realm's stored connection (a hash), encrypting secrets; returns the result."""
        if not metadata.realm_id:
            raise ValueError("realm_id is required")
        plain_secrets = sorted(f for f in MUST_ENCRYPT_FIELDS if getattr(metadata, f))
        if plain_secrets and not self._box.enabled and not allow_plaintext:
            raise EncryptionRequired(
                f"refusing to store {', '.join(plain_secrets)} in plain text: set QBO_ENCRYPTION_KEYS "
                "(qbo-webhooks keys generate) or pass --allow-plaintext"
            )
        key = self._keys.connection(metadata.realm_id)
        for _ in range(PUT_ATTEMPTS):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    # Read and write under WATCH: another writer's change in between makes us read again, never
                    # lost under our write.
                    await pipe.watch(key)
                    current, merged, stored = await self._merged(pipe, metadata.realm_id, metadata)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(key)  # the hash becomes exactly our fields, with no expiry (and a JSON string a hash)
                    pipe.hset(key, mapping=cast("dict[Any, Any]", stored))
                    await pipe.execute()
                    break
            except WatchError:
                continue
            except RedisError as exc:
                raise StorageUnavailable(f"writing the connection failed: {type(exc).__name__}") from exc
        else:
            raise StorageUnavailable(f"the connection of realm {metadata.realm_id} kept changing; try again")
        token = merged.get("webhook_verifier_token")
        if token:
            await self.note_token(token)
        if current and current.webhook_verifier_token and current.webhook_verifier_token != token:
            await self.note_token(current.webhook_verifier_token)  # the replaced token is now retiring
        await self._announce(metadata.realm_id)
        return ConnectionMetadata.from_mapping(dict(merged))

    async def _merged(
        self, reader: Redis, realm_id: str, metadata: ConnectionMetadata
    ) -> tuple[ConnectionMetadata | None, dict[str, str], dict[str, str | bytes]]:
        """The stored connection, it merged with ``metadata``, and what to write (secrets encrypted)."""
        kind, data, undecodable = await self._read_raw(realm_id, reader)
        if kind != "none" and data is None:
            raise UnreadableConnection(
                f"the connection of realm {realm_id} is stored as a {kind} that is not a hash nor a JSON object "
                "(another writer's?); not overwritten: inspect it, then delete it to register the realm anew"
            )
        current = self._metadata(data)
        merged = {**(current.as_dict() if current else {}), **metadata.as_dict()}
        # A field of ours whose stored value is not UTF-8 (another writer's binary blob) is written back as it was.
        stored: dict[str, str | bytes] = {name: value for name, value in undecodable.items() if name not in merged}
        stored.update({k: self._box.encrypt(v) if k in ENCRYPTED_FIELDS else v for k, v in merged.items()})
        return current, merged, stored

    async def delete(self, realm_id: str) -> bool:
        """Remove a connection; its token stays known for the retention (SPEC §4.4). True if it existed."""
        current = await self.get(realm_id)
        try:
            removed = await self._redis.delete(self._keys.connection(realm_id))
        except RedisError as exc:
            raise StorageUnavailable(f"deleting the connection failed: {type(exc).__name__}") from exc
        if current and current.webhook_verifier_token:
            await self.note_token(current.webhook_verifier_token)
        await self._announce(realm_id)
        return bool(removed)

    async def _announce(self, realm_id: str) -> None:
        """Tell running services to drop their cached copy now, not at the end of the cache time."""
        self.forget(realm_id)
        await self._redis.publish(self._keys.connection_changes, realm_id)

    async def follow_changes(self) -> None:
        """Forget cached routes as ``put``/``delete`` announce changes (runs until cancelled; reconnects)."""
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self._keys.connection_changes)
                    self.forget()  # whatever changed while nobody was listening
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self.forget(str(message["data"]))
            except (RedisError, OSError) as exc:
                logger.debug("connection-change subscription lost (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def realm_ids(self) -> list[str]:
        """Every registered realm id, sorted."""
        realms = [self._keys.realm_of(key) async for key in scan_keys(self._redis, self._keys.connection_pattern)]
        return sorted(realms, key=lambda r: (len(r), r))

    async def note_token(self, token: str, seen_at: float | None = None) -> None:
        """Record a verifier token in the known-token index as seen now (or at ``seen_at``).

        A token still in its stored form (no configured key decrypts it) is not a token anyone signs with: skipped.
        """
        if SecretBox.is_encrypted(token):
            return
        value = orjson.dumps({"token": self._box.encrypt(token), "last_seen": seen_at or time.time()}).decode()
        await self._redis.hset(self._keys.verifier_tokens, fingerprint(token), value)
        self._known_tokens_expire = 0.0

    async def rebuild_token_index(self) -> int:
        """Re-scan every connection (including those other writers made) into the index; prune expired tokens.

        Returns the number of tokens the index holds afterwards.
        """
        now = time.time()
        seen: dict[str, str] = {}
        async for key in scan_keys(self._redis, self._keys.connection_pattern):
            realm_id = self._keys.realm_of(key)
            # Only the routing fields: another field holding bytes that are not UTF-8 (another writer's
            # session blob) must not stop the scan for every tenant.
            route = (await self._read_routes([realm_id]))[realm_id]
            if route is not None and route.token:
                seen[fingerprint(route.token)] = route.token
        for token in seen.values():
            await self.note_token(token, now)
        # Entries another writer garbled (not UTF-8) are skipped when read, and removed here: the index is ours.
        raw, unreadable = await text_hash(self._redis, self._keys.verifier_tokens)
        expired: list[str | bytes] = [
            fp for fp, v in raw.items() if fp not in seen and _expired(v, now, self._retired_seconds)
        ]
        expired.extend(unreadable)
        if expired:
            await self._redis.hdel(self._keys.verifier_tokens, *expired)
        self._known_tokens_expire = 0.0
        return len(raw) + len(unreadable) - len(expired)

    async def _read_raw(
        self, realm_id: str, reader: Redis | None = None
    ) -> tuple[str, dict[str, object] | None, dict[str, bytes]]:
        """The key's type, its fields as text (``None``: no readable connection there), and the fields of
        ``ConnectionMetadata`` whose value is not UTF-8 text, as bytes. ``reader``: a pipeline under WATCH."""
        key = self._keys.connection(realm_id)
        redis = reader if reader is not None else self._redis
        try:
            reply = await redis.type(key)
            kind = reply.decode() if isinstance(reply, bytes) else reply
            if kind == "hash":
                # One value that is not UTF-8 must not make the whole connection unreadable (nor stop an operator
                # from showing, updating or deleting it); one of our fields holding one is kept as bytes.
                fields, unreadable = await text_hash(redis, key)
                ours = {name.decode(): value for name, value in unreadable.items() if name in _METADATA_NAMES}
                return kind, dict(fields), ours
            if kind == "string":
                text = await redis.execute_command("GET", key, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
                return kind, _json_object(text), {}
        except RedisError as exc:
            raise StorageUnavailable(f"reading the connection failed: {type(exc).__name__}") from exc
        return kind, None, {}


def _text(realm_id: str, name: str, value: object) -> str | None:
    """A stored value as text; bytes that are not UTF-8 are unusable (logged, never decoded into something else)."""
    if not isinstance(value, bytes):
        return value if isinstance(value, str) else None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        logger.error("connection of realm %s: %s is not UTF-8 text; treated as missing", realm_id, name)
        return None


_METADATA_NAMES = frozenset(name.encode() for name in ConnectionMetadata.field_names())  # as stored: bytes


def _json_object(text: object) -> dict[str, Any] | None:
    if not isinstance(text, str | bytes):
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _expired(value: str, now: float, retention: float) -> bool:
    data = _json_object(value)
    try:
        return data is None or now - float(data.get("last_seen", 0) or 0) > retention
    except (TypeError, ValueError):
        return True


def _lua(name: str) -> str:
    return resources.files("service").joinpath("lua", name).read_text(encoding="utf-8")
