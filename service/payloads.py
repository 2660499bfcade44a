"""Intuit's two payload formats (SPEC §2.2), parsed into one ``Event`` schema (SPEC §5.2).

Parsing never raises: what cannot be understood becomes an ``InvalidEvent`` (one element) or an
unparseable ``ParsedBody`` (the whole body), both of which are dead-lettered once the body is authentic.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from datetime import date, datetime, timedelta

import orjson

from service.models import Event, InvalidEvent

LEGACY = "legacy"
CLOUDEVENTS = "cloudevents"

KNOWN_ENTITIES = (
    *("Account", "Bill", "BillPayment", "Budget", "ChangeOrder", "Class", "CompanyCurrency", "CreditMemo"),
    *("Currency", "Customer", "Department", "Deposit", "Employee", "Estimate", "Invoice", "Item", "JournalCode"),
    *("JournalEntry", "Payment", "PaymentMethod", "Preferences", "Purchase", "PurchaseOrder", "RefundReceipt"),
    *("SalesReceipt", "TaxAgency", "Term", "TimeActivity", "Transfer", "Vendor", "VendorCredit"),
)
_ENTITY_BY_LOWER = {name.lower(): name for name in KNOWN_ENTITIES}

# CloudEvents operation word -> legacy operation word, and back.
_OPERATION_BY_VERB = {
    "created": "Create",
    "updated": "Update",
    "deleted": "Delete",
    "merged": "Merge",
    "void": "Void",
    "voided": "Void",
    "emailed": "Emailed",
}
VERB_BY_OPERATION = {
    "Create": "created",
    "Update": "updated",
    "Delete": "deleted",
    "Merge": "merged",
    "Void": "void",
    "Emailed": "emailed",
}
_OPERATION_BY_LOWER = {op.lower(): op for op in VERB_BY_OPERATION}

_CE_TYPE = re.compile(r"qbo\.([A-Za-z0-9_]+)\.([A-Za-z_]+)\.v([0-9]+)", re.ASCII)
_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?\s*(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,
)
_UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z", re.ASCII)
_SECOND = re.compile(r"\d{4}-\d\d-\d\dT(\d\d):(\d\d):(\d\d)", re.ASCII)
_MAX_REALM_ID = 32
_MAX_ID = 1024
_BOM = b"\xef\xbb\xbf"


class ParsedBody:
    """A body's events in received order, or ``format is None`` when the body is unparseable.

    A plain class, not a dataclass: compiled (``service/compiled.py``), a dataclass's ``__init__`` runs as Python.
    """

    __slots__ = ("detail", "format", "items")

    def __init__(self, format: str | None, items: tuple[Event | InvalidEvent, ...] = (), detail: str = "") -> None:
        self.format = format
        self.items = items
        self.detail = detail

    def __repr__(self) -> str:
        return f"ParsedBody(format={self.format!r}, items={self.items!r}, detail={self.detail!r})"

    @property
    def unparseable(self) -> bool:
        return self.format is None

    def realm_ids(self) -> set[str]:
        """Distinct valid realm ids named by the body (invalid elements' realm ids too, when digit strings)."""
        return {item.realm_id for item in self.items if item.realm_id}


def parse_body(body: bytes) -> ParsedBody:
    """Detect the format (SPEC §4.2) and normalise every element. Never raises."""
    try:
        document = orjson.loads(body[3:] if body.startswith(_BOM) else body)
    except orjson.JSONDecodeError as exc:
        # Not JSON, not UTF-8, or JSON orjson refuses (numbers beyond a double, lone surrogates, depth > 1024).
        return ParsedBody(None, detail=f"not JSON: {str(exc)[:80]}")
    try:
        return _parse_document(document)
    except orjson.JSONEncodeError:
        # orjson reads 1024 levels of nesting but writes only 255: such an element cannot be re-serialised
        # into a payload field, so the body is kept whole instead.
        return ParsedBody(None, detail="JSON nested too deep to store an element")


def _parse_document(document: object) -> ParsedBody:
    if isinstance(document, list):
        return ParsedBody(CLOUDEVENTS, tuple([_cloudevent(element) for element in document]))
    if isinstance(document, dict):
        if "specversion" in document:
            return ParsedBody(CLOUDEVENTS, (_cloudevent(document),))
        if "eventNotifications" in document:
            notifications = document["eventNotifications"]
            if not isinstance(notifications, list):
                return ParsedBody(None, detail="eventNotifications is not an array")
            return ParsedBody(LEGACY, tuple([item for n in notifications for item in _legacy_notification(n)]))
        return ParsedBody(None, detail="JSON object with neither eventNotifications nor specversion")
    return ParsedBody(None, detail=f"JSON {type(document).__name__} is neither an array nor an object")


def _legacy_notification(notification: object) -> Iterator[Event | InvalidEvent]:
    if not isinstance(notification, dict):
        yield _invalid("", "notification is not an object", notification)
        return
    realm_id = _realm_id(notification.get("realmId"))
    if realm_id is None:
        yield _invalid("", "realmId is missing or not a digit string", notification)
        return
    change = notification.get("dataChangeEvent")
    entities = change.get("entities") if isinstance(change, dict) else None
    if not isinstance(entities, list):
        yield _invalid(realm_id, "dataChangeEvent.entities is missing or not an array", notification)
        return
    for entity in entities:
        yield _legacy_entity(realm_id, entity)


def _legacy_entity(realm_id: str, entity: object) -> Event | InvalidEvent:
    if not isinstance(entity, dict):
        return _invalid(realm_id, "entity is not an object", entity)
    name = entity.get("name")
    entity_id = _text_id(entity.get("id"))
    operation = entity.get("operation")
    if not isinstance(name, str) or not name.strip():
        return _invalid(realm_id, "entity name is missing", entity)
    if entity_id is None:
        return _invalid(realm_id, "entity id is missing", entity)
    if not isinstance(operation, str) or not operation.strip():
        return _invalid(realm_id, "entity operation is missing", entity)
    name = _ENTITY_BY_LOWER.get(name.lower(), name)
    operation = _OPERATION_BY_LOWER.get(operation.lower(), operation)
    deleted_id = _text_id(_get_ci(entity, "deletedid")) or ""
    occurred = entity.get("lastUpdated")
    occurred_at = occurred if isinstance(occurred, str) else ""
    instant = utc_instant(occurred_at) or f"raw:{occurred_at}"
    verb = VERB_BY_OPERATION.get(operation, operation.lower())
    # Positional: keywords cost more than the rest of building an Event (fields in Event's order).
    return Event(
        event_id(realm_id, name, entity_id, operation, deleted_id, instant),
        "",
        realm_id,
        name,
        entity_id,
        operation,
        deleted_id,
        occurred_at,
        f"qbo.{name.lower()}.{verb}.v1",
        LEGACY,
        compact_json(entity),
    )


def _cloudevent(element: object) -> Event | InvalidEvent:
    if not isinstance(element, dict):
        return _invalid("", "event is not an object", element)
    realm_id = _realm_id(element.get("intuitaccountid"))
    if realm_id is None:
        return _invalid("", "intuitaccountid is missing or not a digit string", element)
    entity_id = _text_id(element.get("intuitentityid"))
    if entity_id is None:
        return _invalid(realm_id, "intuitentityid is missing", element)
    event_type = element.get("type")
    names = _type_names(event_type) if isinstance(event_type, str) else None
    if names is None or not isinstance(event_type, str):
        return _invalid(realm_id, "type is not qbo.<entity>.<operation>.v<N>", element)
    entity, operation = names
    source_id = element.get("id")
    source_id = source_id if isinstance(source_id, str) else ""
    occurred = element.get("time")
    occurred_at = occurred if isinstance(occurred, str) else ""
    data = element.get("data")
    # Intuit sends ``"data": {}`` but for merges: an empty object needs no look-up.
    deleted_id = (_text_id(_get_ci(data, "deletedid")) if data and isinstance(data, dict) else None) or ""
    instant = utc_instant(occurred_at) or f"id:{source_id}"
    return Event(
        event_id(realm_id, entity, entity_id, operation, deleted_id, instant),
        source_id,
        realm_id,
        entity,
        entity_id,
        operation,
        deleted_id,
        occurred_at,
        event_type,
        CLOUDEVENTS,
        compact_json(element),
    )


@functools.lru_cache(maxsize=1024)
def _type_names(event_type: str) -> tuple[str, str] | None:
    """(PascalCase entity, operation word) of a CloudEvents type; types are few, so results are cached."""
    match = _CE_TYPE.fullmatch(event_type)
    if match is None:
        return None
    lower_entity, verb = match.group(1).lower(), match.group(2).lower()
    entity = _ENTITY_BY_LOWER.get(lower_entity) or lower_entity[:1].upper() + lower_entity[1:]
    return entity, _OPERATION_BY_VERB.get(verb, match.group(2))


def event_id(realm_id: str, entity: str, entity_id: str, operation: str, deleted_id: str, instant: str) -> str:
    """The format-independent fingerprint of a change (SPEC §5.2)."""
    joined = "\x1f".join((realm_id, entity, entity_id, operation, deleted_id, instant))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]


def utc_instant(text: str) -> str | None:
    """An event time as UTC truncated to milliseconds (``YYYY-MM-DDTHH:MM:SS.mmmZ``), or ``None``.

    Accepts any fraction precision (none to nanoseconds) and offsets as ``Z``, ``±HH:MM`` or ``±HHMM``;
    a time without offset is UTC.
    """
    if not text:
        return None
    if (
        len(text) == 24
        and text[10] == "T"
        and text[19] == "."
        and text[23] == "Z"
        and text[20:23].isdigit()
        and text.isascii()
    ):
        # Already the answer's shape, as most of Intuit's times are: only its second needs checking.
        return text if _valid_second(text[:19]) else None
    fast = _UTC_TIME.fullmatch(text)
    if fast is not None:  # already UTC with a Z
        return f"{text[:19]}.{(fast.group(4) or '')[:3].ljust(3, '0')}Z" if _valid_second(text[:19]) else None
    match = _TIME.fullmatch(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, _z, sign, off_h, off_m = match.groups()
    millis = (fraction or "")[:3].ljust(3, "0")
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
        if not sign:  # already UTC, the common case: the matched digits are the answer
            return f"{year}-{month}-{day}T{hour}:{minute}:{second}.{millis}Z"
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        moment = moment - offset if sign == "+" else moment + offset
    except (ValueError, OverflowError):
        return None
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{millis}Z"
    )


@functools.lru_cache(maxsize=4096)
def _valid_second(text: str) -> bool:
    """Whether ``YYYY-MM-DDTHH:MM:SS`` (ASCII digits) names a real second (events of a burst share it, hence
    the cache)."""
    match = _SECOND.fullmatch(text)
    if match is None:
        return False
    hour, minute, second = match.groups()
    if hour > "23" or minute > "59" or second > "59":
        return False
    try:
        date.fromisoformat(text[:10])
    except ValueError:
        return False
    return True


def compact_json(value: object) -> str:
    """Compact JSON, keys in received order, non-ASCII unescaped (the ``payload`` field's form)."""
    return orjson.dumps(value).decode("utf-8")


def _realm_id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= _MAX_REALM_ID and value.isascii() and value.isdigit():
        return value
    return None


def _text_id(value: object) -> str | None:
    """Ids are strings (leading zeros matter); an integer is taken as its decimal text, anything else is no id."""
    if isinstance(value, str):
        return value if 0 < len(value) <= _MAX_ID and value.strip() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _get_ci(mapping: dict[str, object], lower_key: str) -> object:
    """A key looked up case-insensitively (``deletedid`` is also seen as ``deletedId``)."""
    if lower_key in mapping:
        return mapping[lower_key]
    first = lower_key[0]
    for key, value in mapping.items():
        if key[:1].lower() == first and key.lower() == lower_key:
            return value
    return None


def _invalid(realm_id: str, detail: str, element: object) -> InvalidEvent:
    return InvalidEvent(realm_id=realm_id, detail=detail, payload=compact_json(element))
