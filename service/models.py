"""Domain models: a normalised event, dead letters, connection metadata and the stream entry schema (SPEC §5)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, fields
from enum import StrEnum

import orjson

SCHEMA_VERSION = "1"


class Outcome(StrEnum):
    """What happened to one event of a delivery."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead_letter"


class DeadLetterReason(StrEnum):
    UNKNOWN_REALM = "unknown_realm"
    TOKEN_MISMATCH = "token_mismatch"
    INVALID_EVENT = "invalid_event"
    UNPARSEABLE = "unparseable"
    HANDLER_FAILED = "handler_failed"


EVENT_FIELDS = (
    *("v", "event_id", "source_id", "realm_id", "entity", "entity_id", "operation", "deleted_id", "occurred_at"),
    *("type", "format", "environment", "received_at", "payload"),
)


class Event:
    """One change event, in the one schema both of Intuit's payload formats are normalised into.

    Not frozen: one is made per event on the hot path, and routing sets ``environment`` on it. A plain class, not
    a dataclass: compiled (``service/compiled.py``), a dataclass's ``__init__`` would still run as Python.
    """

    __slots__ = (
        *("event_id", "source_id", "realm_id", "entity", "entity_id", "operation", "deleted_id", "occurred_at"),
        *("type", "format", "payload", "environment"),
    )

    def __init__(
        self,
        event_id: str,
        source_id: str,
        realm_id: str,
        entity: str,
        entity_id: str,
        operation: str,
        deleted_id: str,
        occurred_at: str,
        type: str,
        format: str,
        payload: str,
        environment: str = "",
    ) -> None:
        self.event_id = event_id
        self.source_id = source_id
        self.realm_id = realm_id
        self.entity = entity
        self.entity_id = entity_id
        self.operation = operation
        self.deleted_id = deleted_id
        self.occurred_at = occurred_at
        self.type = type
        self.format = format
        self.payload = payload
        self.environment = environment

    def __repr__(self) -> str:
        return f"Event(event_id={self.event_id!r}, realm_id={self.realm_id!r}, type={self.type!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.stream_values("") == other.stream_values("")

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def stream_values(self, received_at: str) -> list[str]:
        """The values of this event's ``qbo:events`` entry, in ``EVENT_FIELDS`` order (SPEC §5.2)."""
        return [SCHEMA_VERSION, self.event_id, self.source_id, self.realm_id, self.entity, self.entity_id,
                self.operation, self.deleted_id, self.occurred_at, self.type, self.format, self.environment,
                received_at, self.payload]  # fmt: skip

    def stream_fields(self, received_at: str) -> dict[str, str]:
        """The ``qbo:events`` entry of this event; every value a string."""
        return dict(zip(EVENT_FIELDS, self.stream_values(received_at), strict=True))


@dataclass(frozen=True, slots=True)
class InvalidEvent:
    """An element of an authentic body that cannot be normalised; it is dead-lettered, never dropped."""

    realm_id: str
    detail: str
    payload: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One ``qbo:events:dead`` entry (SPEC §5.4)."""

    reason: DeadLetterReason
    realm_id: str
    detail: str
    verified_by: str
    payload: str
    base64: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def stream_fields(self, received_at: str) -> dict[str, str]:
        entry = {
            "v": SCHEMA_VERSION,
            "reason": self.reason.value,
            "realm_id": self.realm_id,
            "received_at": received_at,
            "detail": self.detail[:200],
            "verified_by": self.verified_by,
            "payload": self.payload,
        }
        if self.base64:
            entry["encoding"] = "base64"
        entry.update(self.extra)
        return entry


SECRET_FIELDS = frozenset(
    {"access_token", "auth_code", "client_secret", "oauth_session_data", "refresh_token", "webhook_verifier_token"}
)
# Secrets stored encrypted when keys are configured; the CLI refuses the first three in plain text (SPEC §5.1).
ENCRYPTED_FIELDS = frozenset({"client_secret", "refresh_token", "access_token", "webhook_verifier_token"})
MUST_ENCRYPT_FIELDS = frozenset({"client_secret", "refresh_token", "access_token"})
MASK = "********"


@dataclass(frozen=True, slots=True)
class ConnectionMetadata:
    """``TypesQuickBooksConnectionMetadata``: exactly the seed type's eleven optional string fields.

    Values are plain text here; encryption happens in storage. ``repr`` masks every secret.
    """

    access_token: str | None = None
    auth_code: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    environment: str | None = None
    income_account_id: str | None = None
    oauth_session_data: str | None = None
    realm_id: str | None = None
    redirect_uri: str | None = None
    refresh_token: str | None = None
    webhook_verifier_token: str | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, data: dict[str, object]) -> ConnectionMetadata:
        """Known fields only (others' writers may add more); non-string values are kept as their JSON text."""
        known = set(cls.field_names())
        values = {
            k: v if isinstance(v, str) else _json_text(v) for k, v in data.items() if k in known and v is not None
        }
        return cls(**values)

    def as_dict(self) -> dict[str, str]:
        return {name: value for name in self.field_names() if (value := getattr(self, name)) is not None}

    def masked(self) -> dict[str, str]:
        return {name: (MASK if name in SECRET_FIELDS and value else value) for name, value in self.as_dict().items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in self.masked().items())
        return f"ConnectionMetadata({inner})"

    def __str__(self) -> str:
        return self.__repr__()


def _json_text(value: object) -> str:
    """A non-string value of a JSON connection as JSON text (``{"a":1}``, ``true``), not Python's ``repr``."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:  # not a JSON value (a caller's own object): its text
        return str(value)


@dataclass(frozen=True, slots=True)
class RealmRoute:
    """What the receiver needs of a realm's connection to route its events (never other secrets)."""

    realm_id: str
    token: str | None  # None: no usable verifier token (missing, or not decryptable)
    environment: str

    def __repr__(self) -> str:
        return f"RealmRoute(realm_id={self.realm_id!r}, token={MASK if self.token else None}, env={self.environment!r})"


@functools.lru_cache(maxsize=2)
def _whole_second(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a second; formatting is the costly part and many requests share a second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def utc_timestamp(now: float | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC."""
    now = time.time() if now is None else now
    seconds = int(now)
    return f"{_whole_second(seconds)}.{int((now - seconds) * 1000):03d}Z"
