"""Key rotation of secrets at rest (SPEC §5.1): re-encrypt every stored secret under the first key.

Safe to interrupt and to re-run: each value is replaced on its own with a compare-and-set (a value a
writer changed meanwhile is left for the next run), and values already under the first key are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError, ResponseError

from service.client import scan_keys, text_hash
from service.crypto import SecretBox
from service.errors import ConfigurationError, DecryptionError, StorageUnavailable
from service.keys import Keys
from service.models import ENCRYPTED_FIELDS

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RotationReport:
    """Counts of one rotation run; ``complete`` when nothing was left behind."""

    connections: int = 0
    rotated: int = 0  # connection secrets re-encrypted (plain ones in our hashes encrypted)
    current: int = 0  # connection secrets already under the first key
    index_rotated: int = 0  # verifier tokens of the known-token index re-encrypted
    index_current: int = 0
    plaintext_left: int = 0  # plain secrets inside JSON strings other writers own: not ours to encrypt
    conflicts: int = 0  # changed by another writer while we worked: run again
    undecryptable: int = 0  # no configured key opens them: left as they are
    unreadable: int = 0  # connections we cannot read (not UTF-8, not a JSON object), index entries not UTF-8

    @property
    def complete(self) -> bool:
        return self.conflicts == 0 and self.undecryptable == 0 and self.unreadable == 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Rotator:
    """Re-encrypts connection secrets and the ``verifier-tokens`` index under ``box``'s first key."""

    def __init__(self, redis: Redis, keys: Keys, box: SecretBox) -> None:
        if not box.enabled:
            raise ConfigurationError("QBO_ENCRYPTION_KEYS is not set: there is no key to rotate to")
        self._redis = redis
        self._keys = keys
        self._box = box
        self._swap = redis.register_script(resources.files("service").joinpath("lua", "swap_field.lua").read_text())

    async def run(self) -> RotationReport:
        """One pass over every connection and the token index; raises ``StorageUnavailable`` if Redis fails."""
        try:
            return await self._run()
        except RedisError as exc:
            # What was rotated stays rotated; running again carries on from there.
            raise StorageUnavailable(f"key rotation interrupted, run it again: {type(exc).__name__}") from None

    async def _run(self) -> RotationReport:
        report = RotationReport()
        skipped: list[bytes] = []
        async for key in scan_keys(self._redis, self._keys.connection_pattern, skipped=skipped):
            report.connections += 1
            kind = await self._redis.type(key)
            if kind == "hash":
                await self._rotate_hash(key, report)
            elif kind == "string":
                await self._rotate_json(key, report)
        report.unreadable += len(skipped)  # key names that are not UTF-8: what they hold was not checked
        await self._rotate_index(report)
        logger.info("key rotation: %s", " ".join(f"{k}={v}" for k, v in report.as_dict().items()))
        return report

    async def _rotate_hash(self, key: str, report: RotationReport) -> None:
        names = sorted(ENCRYPTED_FIELDS)
        # As bytes: another writer's value that is not UTF-8 (in any field) must not stop the rotation of the rest.
        raw = await self._redis.execute_command("HMGET", key, *names, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
        for name, stored in zip(names, raw, strict=True):
            if not stored:
                continue
            try:
                value = stored.decode("utf-8")
            except UnicodeDecodeError:
                report.undecryptable += 1
                logger.error("cannot rotate %s of %s: the stored value is not UTF-8 text", name, key)
                continue
            if self._box.is_current(value):
                report.current += 1
                continue
            new = self._new_value(key, name, value, report)
            if new is not None:
                if await self._cas(key, name, value, new):
                    report.rotated += 1
                else:
                    report.conflicts += 1

    async def _rotate_json(self, key: str, report: RotationReport) -> None:
        stored = await self._redis.execute_command("GET", key, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
        if not isinstance(stored, bytes):
            return  # deleted (or replaced by another type) since the scan
        try:
            data = orjson.loads(stored)  # refuses bytes that are not UTF-8 as well as text that is not JSON
        except orjson.JSONDecodeError:
            data = None  # not ours to read, nor to rewrite
        if not isinstance(data, dict):
            # It may hold secrets under the old key: the rotation cannot be called complete.
            report.unreadable += 1
            logger.error("cannot rotate the secrets of %s: its string value is not a JSON object in UTF-8", key)
            return
        changed = 0
        for name in sorted(ENCRYPTED_FIELDS & data.keys()):
            value = data[name]
            if not isinstance(value, str) or not value:
                continue
            if not SecretBox.is_encrypted(value):
                report.plaintext_left += 1  # the other writer reads it in plain text: leave it so
            elif self._box.is_current(value):
                report.current += 1
            elif (new := self._new_value(key, name, value, report)) is not None:
                data[name] = new
                changed += 1
        if changed:
            if await self._cas(key, "", stored.decode("utf-8"), orjson.dumps(data).decode("utf-8")):
                report.rotated += changed
            else:
                report.conflicts += changed

    async def _rotate_index(self, report: RotationReport) -> None:
        index = self._keys.verifier_tokens
        entries, unreadable = await text_hash(self._redis, index)
        report.unreadable += len(unreadable)  # garbled by another writer: not checked (the service removes them)
        for fp, value in sorted(entries.items()):
            try:
                data: Any = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            token = data.get("token") if isinstance(data, dict) else None
            if not isinstance(token, str) or not token:
                continue
            if self._box.is_current(token):
                report.index_current += 1
                continue
            new = self._new_value(index, fp, token, report)
            if new is None:
                continue
            data["token"] = new
            if await self._cas(index, fp, value, orjson.dumps(data).decode("utf-8")):
                report.index_rotated += 1
            else:
                report.conflicts += 1

    def _new_value(self, key: str, name: str, value: str, report: RotationReport) -> str | None:
        try:
            return self._box.rotate(value)
        except DecryptionError:
            report.undecryptable += 1
            # Names only where the value is; never the value.
            logger.error("cannot rotate %s of %s: no configured key decrypts it", name or "the value", key)
            return None

    async def _cas(self, key: str, name: str, old: str, new: str) -> bool:
        try:
            return bool(await self._swap(keys=[key], args=[name, old, new]))
        except ResponseError:  # not expected (the script checks the key's type): counted as a conflict, run again
            return False
