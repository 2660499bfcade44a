"""Typed entries of the events stream (SPEC §5.2), as consumers receive them.

Importable without Starlette: this is part of the consumer library.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from service.errors import QBOError
from service.models import EVENT_FIELDS

SUPPORTED_VERSIONS = frozenset({"1"})

# The fields of a version-1 entry, in the order the receiver writes them.
V1_FIELDS = EVENT_FIELDS


class SchemaError(QBOError):
    """A stream entry is not an event this library understands (unknown ``v``, or a field is missing)."""


async def _not_attached() -> None:
    raise RuntimeError("this StreamEvent is not attached to a Consumer")


async def _not_attached_fail(error: BaseException) -> None:
    await _not_attached()


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One entry of ``qbo:events``, parsed and typed.

    ``entry_id`` is the stream entry id (what is acknowledged), ``deliveries`` how many times the
    group has delivered it so far (1 the first time), ``fields`` the raw entry as read.
    Call ``await event.ack()`` once it is processed; an event never acknowledged is delivered again
    after the consumer's ``claim_idle``.
    """

    entry_id: str
    v: str
    event_id: str
    source_id: str
    realm_id: str
    entity: str
    entity_id: str
    operation: str
    deleted_id: str
    occurred_at: str
    type: str
    format: str
    environment: str
    received_at: str
    payload: str
    deliveries: int = 1
    fields: Mapping[str, str] = field(default_factory=dict, repr=False)
    _ack: Callable[[], Awaitable[None]] = field(default=_not_attached, repr=False, compare=False)
    _fail: Callable[[BaseException], Awaitable[None]] = field(default=_not_attached_fail, repr=False, compare=False)

    @classmethod
    def from_entry(
        cls,
        entry_id: str,
        fields: Mapping[str, str],
        *,
        deliveries: int = 1,
        ack: Callable[[], Awaitable[None]] = _not_attached,
        fail: Callable[[BaseException], Awaitable[None]] = _not_attached_fail,
    ) -> StreamEvent:
        """Parse one stream entry; raises ``SchemaError`` for an unknown version or a missing field.

        ``ack`` and ``fail`` are what ``ack()`` and ``fail()`` call (the consumer provides them)."""
        version = fields.get("v")
        if version not in SUPPORTED_VERSIONS:
            raise SchemaError(f"entry {entry_id} has unsupported schema version {version!r}")
        missing = [name for name in V1_FIELDS if name not in fields]
        if missing:
            raise SchemaError(f"entry {entry_id} lacks {', '.join(missing)}")
        values = {name: str(fields[name]) for name in V1_FIELDS}
        return cls(entry_id=entry_id, deliveries=deliveries, fields=dict(fields), _ack=ack, _fail=fail, **values)

    def payload_json(self) -> Any:
        """The original event as Intuit sent it (for legacy events: the entity object), decoded."""
        return orjson.loads(self.payload)

    async def ack(self) -> None:
        """Acknowledge the entry for the consumer's group: it will not be delivered to the group again."""
        await self._ack()

    async def fail(self, error: BaseException) -> None:
        """Report that processing failed: the entry stays pending and is retried after ``claim_idle``;
        on its ``max_deliveries``-th delivery it is moved to the dead-letter stream instead."""
        await self._fail(error)
