"""Dead-letter operations (SPEC §5.4): list, count, replay and purge letters of ``qbo:events:dead``.

Replay moves a letter back into the events stream and deletes it in one Lua call (``lua/replay.lua``):
- ``unknown_realm``: only once the realm is registered and its current verifier token's fingerprint
  equals the letter's ``verified_by``; re-routed with that connection's environment, through the
  normal dedupe (a replay repeated, or of an event queued meanwhile, queues nothing new);
- ``handler_failed``: the original entry (same ``event_id``) is appended again, bypassing dedupe;
- ``token_mismatch``, ``invalid_event``, ``unparseable``: never replayed; list, inspect, purge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis

from service.crypto import SecretBox
from service.keys import Keys
from service.models import ConnectionMetadata, DeadLetter, DeadLetterReason, Event, utc_timestamp
from service.payloads import parse_body
from service.signature import fingerprint

REPLAYABLE = frozenset({DeadLetterReason.UNKNOWN_REALM.value, DeadLetterReason.HANDLER_FAILED.value})
_PAGE = 1000
_MAX_ERROR = 500


class ConnectionReader(Protocol):
    """What replay needs of the connection store: a realm's metadata, decrypted."""

    async def get(self, realm_id: str) -> ConnectionMetadata | None: ...


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter: its id in the dead-letter stream and its fields as stored."""

    id: str
    fields: Mapping[str, str]

    @property
    def reason(self) -> str:
        return self.fields.get("reason", "")

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, **self.fields}


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What replaying one letter did. ``status``: ``queued`` (appended through dedupe), ``duplicate``
    (already queued; letter deleted), ``redelivered`` (handler_failed re-appended), ``refused`` (left in
    place; ``detail`` says why) or ``gone`` (the letter no longer exists)."""

    letter_id: str
    reason: str
    status: str
    detail: str = ""
    entry_id: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "letter_id": self.letter_id,
            "reason": self.reason,
            "status": self.status,
            "detail": self.detail,
            "entry_id": self.entry_id,
        }


def handler_failed_letter(entry_id: str, fields: Mapping[str, str], *, error: str, detail: str) -> dict[str, str]:
    """The ``handler_failed`` letter of an events-stream entry (SPEC §5.4).

    Besides the common fields it carries ``event_id``, ``entry_id``, ``error`` ("ExcType: message")
    and ``entry``: the original entry's other fields as a JSON object, so replay can re-append it as it was.
    """
    original = {name: value for name, value in fields.items() if name != "payload"}
    letter = DeadLetter(
        reason=DeadLetterReason.HANDLER_FAILED,
        realm_id=fields.get("realm_id", ""),
        detail=detail,
        verified_by="",
        payload=fields.get("payload", ""),
        extra={
            "event_id": fields.get("event_id", ""),
            "entry_id": entry_id,
            "error": error[:_MAX_ERROR],
            "entry": orjson.dumps(original).decode("utf-8"),
        },
    )
    return letter.stream_fields(fields.get("received_at") or utc_timestamp())


class DeadLetters:
    """The dead-letter stream and its operations. ``connections`` is needed only to replay ``unknown_realm``."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        connections: ConnectionReader | None = None,
        *,
        dedupe_ttl_seconds: int = 7 * 24 * 3600,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._connections = connections
        self._ttl = str(dedupe_ttl_seconds)
        self._replay = redis.register_script(resources.files("service").joinpath("lua", "replay.lua").read_text())

    async def scan(self, reason: str | None = None) -> AsyncIterator[Letter]:
        """Every letter, oldest first (optionally only one reason), read in pages."""
        start = "-"
        while True:
            page: list[tuple[str, dict[str, str]]]
            page = await self._redis.xrange(self._keys.dead_letters, start, "+", count=_PAGE)  # type: ignore[assignment]
            for letter_id, fields in page:
                if reason is None or fields.get("reason") == reason:
                    yield Letter(letter_id, fields)
            if len(page) < _PAGE:
                return
            start = "(" + page[-1][0]

    async def list_letters(self, reason: str | None = None, count: int | None = None) -> list[Letter]:
        """Letters oldest first, at most ``count``."""
        found: list[Letter] = []
        async for letter in self.scan(reason):
            if count is not None and len(found) >= count:
                break
            found.append(letter)
        return found

    async def get(self, letter_id: str) -> Letter | None:
        entries: list[tuple[str, dict[str, str]]]
        entries = await self._redis.xrange(self._keys.dead_letters, letter_id, letter_id)  # type: ignore[assignment]
        return Letter(*entries[0]) if entries else None

    async def counts(self) -> dict[str, int]:
        """Number of letters by reason."""
        counts: dict[str, int] = {}
        async for letter in self.scan():
            counts[letter.reason] = counts.get(letter.reason, 0) + 1
        return dict(sorted(counts.items()))

    async def purge(self, letter_ids: Iterable[str]) -> int:
        """Delete these letters; returns how many existed."""
        ids = list(letter_ids)
        removed = 0
        for i in range(0, len(ids), _PAGE):
            removed += int(await self._redis.xdel(self._keys.dead_letters, *ids[i : i + _PAGE]))
        return removed

    async def replay_matching(self, reason: str | None = None, letter_id: str | None = None) -> list[ReplayOutcome]:
        """Replay one letter (``letter_id``), or every letter of ``reason``, or every replayable letter."""
        if letter_id is not None:
            letter = await self.get(letter_id)
            if letter is None:
                return [ReplayOutcome(letter_id, "", "gone", "no such dead letter")]
            if reason is not None and letter.reason != reason:
                return [ReplayOutcome(letter_id, letter.reason, "refused", f"its reason is not {reason}")]
            return [await self.replay(letter)]
        outcomes = []
        async for letter in self.scan(reason):
            if reason is not None or letter.reason in REPLAYABLE:
                outcomes.append(await self.replay(letter))
        return outcomes

    async def replay(self, letter: Letter) -> ReplayOutcome:
        """Replay one letter under the rules of SPEC §5.4; a refused letter is left where it is."""
        if letter.reason == DeadLetterReason.UNKNOWN_REALM:
            return await self._replay_unknown_realm(letter)
        if letter.reason == DeadLetterReason.HANDLER_FAILED:
            return await self._replay_handler_failed(letter)
        return self._refused(letter, f"{letter.reason or 'this'} letters are never replayed; list, inspect or purge")

    async def _replay_unknown_realm(self, letter: Letter) -> ReplayOutcome:
        if self._connections is None:
            raise RuntimeError("replaying unknown_realm letters needs a connection store")
        realm_id = letter.fields.get("realm_id", "")
        verified_by = letter.fields.get("verified_by", "")
        if not realm_id:
            return self._refused(letter, "the letter names no realm")
        if not verified_by:
            return self._refused(letter, "the letter does not say which token verified it")
        metadata = await self._connections.get(realm_id)
        if metadata is None:
            return self._refused(letter, f"realm {realm_id} is not registered")
        token = metadata.webhook_verifier_token
        if not token:
            return self._refused(letter, f"realm {realm_id} has no verifier token")
        if SecretBox.is_encrypted(token):  # the store hands back what no configured key opens as stored
            return self._refused(letter, f"realm {realm_id}'s verifier token cannot be decrypted (QBO_ENCRYPTION_KEYS)")
        current = fingerprint(token)
        if current != verified_by:
            return self._refused(
                letter,
                f"realm {realm_id}'s token (fingerprint {current}) is not the one that verified the delivery "
                f"({verified_by})",
            )
        if letter.fields.get("encoding") == "base64":
            return self._refused(letter, "the payload is not an event")
        event = event_from_letter(realm_id, letter.fields.get("payload", ""))
        if event is None:
            return self._refused(letter, "the payload does not parse as an event")
        if event.realm_id != realm_id:
            return self._refused(letter, f"the payload names realm {event.realm_id}, the letter {realm_id}")
        event.environment = metadata.environment or ""
        fields = event.stream_fields(letter.fields.get("received_at") or utc_timestamp())
        keys = [self._keys.events, self._keys.dead_letters, self._keys.seen(event.event_id)]
        status, entry_id = await self._replay(keys=keys, args=[letter.id, self._ttl, *_flatten(fields)])
        detail = "already queued; letter deleted" if status == "duplicate" else ""
        return ReplayOutcome(letter.id, letter.reason, status, detail or f"event {event.event_id}", entry_id)

    async def _replay_handler_failed(self, letter: Letter) -> ReplayOutcome:
        try:
            original: Any = orjson.loads(letter.fields.get("entry", ""))
        except orjson.JSONDecodeError:
            return self._refused(letter, "the letter does not hold its original entry")
        if not isinstance(original, dict) or original.get("event_id") != letter.fields.get("event_id"):
            return self._refused(letter, "the letter's original entry is not readable")
        fields = {str(name): str(value) for name, value in original.items()}
        fields["payload"] = letter.fields.get("payload", "")
        keys = [self._keys.events, self._keys.dead_letters]
        status, entry_id = await self._replay(keys=keys, args=[letter.id, "0", *_flatten(fields)])
        if status == "queued":
            return ReplayOutcome(letter.id, letter.reason, "redelivered", f"event {fields['event_id']}", entry_id)
        return ReplayOutcome(letter.id, letter.reason, status)

    @staticmethod
    def _refused(letter: Letter, why: str) -> ReplayOutcome:
        return ReplayOutcome(letter.id, letter.reason, "refused", why)


def event_from_letter(realm_id: str, payload: str) -> Event | None:
    """Rebuild the ``Event`` of a receiver letter's payload (one CloudEvent, or one legacy entity object)."""
    try:
        element = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    body: object
    if isinstance(element, dict) and ("specversion" in element or "type" in element):
        body = [element]
    else:
        body = {"eventNotifications": [{"realmId": realm_id, "dataChangeEvent": {"entities": [element]}}]}
    parsed = parse_body(orjson.dumps(body))
    if len(parsed.items) != 1 or not isinstance(parsed.items[0], Event):
        return None
    return parsed.items[0]


def _flatten(fields: Mapping[str, str]) -> list[str]:
    return [part for name, value in fields.items() for part in (name, value)]
