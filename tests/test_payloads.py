from __future__ import annotations

import json

import orjson
import pytest

from service.models import Event, InvalidEvent
from service.payloads import CLOUDEVENTS, LEGACY, event_id, parse_body, utc_instant
from tests.helpers import fixture_bytes


def only_events(body: bytes) -> list[Event]:
    parsed = parse_body(body)
    assert not parsed.unparseable
    assert all(isinstance(item, Event) for item in parsed.items)
    return [item for item in parsed.items if isinstance(item, Event)]


def test_legacy_real_delivery() -> None:
    (event,) = only_events(fixture_bytes("legacy-real-signed.json"))
    assert (event.realm_id, event.entity, event.entity_id, event.operation) == (
        "4620816365020074550",
        "Invoice",
        "163",
        "Create",
    )
    assert event.type == "qbo.invoice.created.v1"
    assert event.format == LEGACY
    assert event.source_id == ""
    assert event.occurred_at == "2019-10-30T15:29:54.000Z"
    assert (
        event.payload == '{"name":"Invoice","id":"163","operation":"Create","lastUpdated":"2019-10-30T15:29:54.000Z"}'
    )


def test_legacy_two_entities_with_offset_times() -> None:
    customer, vendor = only_events(fixture_bytes("legacy-two-entities.json"))
    assert (customer.entity, vendor.entity) == ("Customer", "Vendor")
    assert customer.realm_id == vendor.realm_id == "1185883450"
    assert customer.occurred_at == "2015-10-05T14:42:19-0700"
    assert customer.event_id != vendor.event_id


def test_legacy_merge_carries_deleted_id() -> None:
    (event,) = only_events(fixture_bytes("legacy-merge.json"))
    assert (event.operation, event.entity_id, event.deleted_id) == ("Merge", "91", "135")
    assert event.type == "qbo.account.merged.v1"


def test_cloudevents_intuit_sample() -> None:
    (event,) = only_events(fixture_bytes("cloudevents-intuit-sample.json"))
    assert (event.realm_id, event.entity, event.entity_id, event.operation) == ("310687", "Account", "1234", "Create")
    assert event.source_id == "88cd52aa-33b6-4351-9aa4-47572edbd068"
    assert event.format == CLOUDEVENTS
    assert event.type == "qbo.account.created.v1"
    assert event.occurred_at == "2025-09-10T21:31:25.179851517Z"
    assert json.loads(event.payload) == json.loads(fixture_bytes("cloudevents-intuit-sample.json"))[0]


def test_cloudevents_merge_and_update_without_data() -> None:
    merge, update = only_events(fixture_bytes("cloudevents-merge-and-update.json"))
    assert (merge.entity, merge.operation, merge.entity_id, merge.deleted_id) == ("Customer", "Merge", "123", "27")
    assert (update.entity, update.operation, update.deleted_id) == ("SalesReceipt", "Update", "")
    assert update.source_id == "0d4e9c1a-7b2f-4e55-8a90-3c6f1b2d4e5f-SalesReceipt-150"


def ce(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "intuit.test",
        "type": "qbo.invoice.updated.v1",
        "time": "2026-01-02T03:04:05.678Z",
        "intuitentityid": "42",
        "intuitaccountid": "123456",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def legacy(*entities: object, realm: object = "123456") -> bytes:
    return orjson.dumps({"eventNotifications": [{"realmId": realm, "dataChangeEvent": {"entities": list(entities)}}]})


@pytest.mark.parametrize(
    ("event", "entity", "operation"),
    [
        pytest.param(ce(type="qbo.changeorder.created.v1"), "ChangeOrder", "Create", id="new-known-entity"),
        pytest.param(ce(type="qbo.widget.created.v1"), "Widget", "Create", id="unknown-entity"),
        pytest.param(ce(type="qbo.invoice.archived.v1"), "Invoice", "archived", id="unknown-operation"),
        pytest.param(ce(type="qbo.journalentry.void.v7"), "JournalEntry", "Void", id="any-version"),
        pytest.param(ce(type="qbo.invoice.emailed.v1"), "Invoice", "Emailed", id="emailed"),
        pytest.param(ce(type="qbo.invoice.deleted.v1"), "Invoice", "Delete", id="deleted"),
    ],
)
def test_cloudevents_open_sets(event: dict[str, object], entity: str, operation: str) -> None:
    (parsed,) = only_events(orjson.dumps([event]))
    assert (parsed.entity, parsed.operation) == (entity, operation)
    assert parsed.type == event["type"]


@pytest.mark.parametrize(
    "data",
    [{"deletedid": "27"}, {"deletedId": "27"}, {"DELETEDID": "27"}],
    ids=["lower", "camel", "upper"],
)
def test_merge_deleted_id_any_letter_case(data: dict[str, str]) -> None:
    (parsed,) = only_events(orjson.dumps([ce(type="qbo.customer.merged.v1", data=data)]))
    assert parsed.deleted_id == "27"


@pytest.mark.parametrize(
    "data",
    [{}, {"deletedid": ""}, {"deletedId": True}, {"other": "27"}, [], ["deletedid", "27"], "deletedid", "", 0, False,
     None],
    ids=["empty", "empty-id", "id-not-an-id", "other-key", "empty-array", "array", "string", "empty-string", "zero",
         "false", "null"],
)  # fmt: skip
def test_no_deleted_id_without_one_in_a_data_object(data: object) -> None:
    event = ce(type="qbo.customer.merged.v1") | {"data": data}  # ce() drops None members; "data": null is kept
    (parsed,) = only_events(orjson.dumps([event]))
    assert parsed.deleted_id == ""
    assert json.loads(parsed.payload)["data"] == data


def test_extra_fields_are_ignored_and_kept_in_payload() -> None:
    (parsed,) = only_events(orjson.dumps([ce(newfield={"x": [1, 2]}, data=None, datacontenttype=None)]))
    assert json.loads(parsed.payload)["newfield"] == {"x": [1, 2]}
    (old,) = only_events(legacy({"name": "Bill", "id": "1", "operation": "Update", "lastUpdated": "x", "extra": 1}))
    assert old.entity == "Bill"


def test_ids_are_strings_with_leading_zeros_and_large_realms() -> None:
    (parsed,) = only_events(orjson.dumps([ce(intuitentityid="0007", intuitaccountid="9341455000000001123")]))
    assert parsed.entity_id == "0007"
    assert parsed.realm_id == "9341455000000001123"


def test_single_structured_cloudevent_is_a_batch_of_one() -> None:
    (parsed,) = only_events(orjson.dumps(ce()))
    assert parsed.format == CLOUDEVENTS


def test_multi_realm_bodies_and_100_event_batches() -> None:
    batch = [ce(id=f"e-{i}", intuitentityid=str(i), intuitaccountid=str(1000 + i % 3)) for i in range(100)]
    parsed = only_events(orjson.dumps(batch))
    assert len(parsed) == 100
    assert len({e.event_id for e in parsed}) == 100
    assert parse_body(orjson.dumps(batch)).realm_ids() == {"1000", "1001", "1002"}


def test_bom_is_tolerated() -> None:
    assert len(only_events(b"\xef\xbb\xbf" + fixture_bytes("legacy-merge.json"))) == 1


def test_same_change_in_both_formats_has_one_event_id() -> None:
    (old,) = only_events(
        legacy(
            {"name": "Customer", "id": "5", "operation": "Update", "lastUpdated": "2026-01-02T05:04:05.678123+02:00"}
        )
    )
    (new,) = only_events(
        orjson.dumps([ce(type="qbo.customer.updated.v1", intuitentityid="5", time="2026-01-02T03:04:05.678999999Z")])
    )
    assert old.event_id == new.event_id
    (merge_old,) = only_events(fixture_bytes("legacy-merge.json"))
    merge_new = ce(
        type="qbo.account.merged.v1",
        intuitentityid="91",
        intuitaccountid="9130350123456789",
        time="2019-06-27T17:12:40Z",
        data={"deletedId": "135"},
    )
    assert merge_old.event_id == only_events(orjson.dumps([merge_new]))[0].event_id


def test_event_id_definition() -> None:
    import hashlib

    expected = hashlib.sha256("\x1f".join(["1", "Invoice", "2", "Create", "", "2026-01-01T00:00:00.000Z"]).encode())
    assert event_id("1", "Invoice", "2", "Create", "", "2026-01-01T00:00:00.000Z") == expected.hexdigest()[:32]


def test_missing_or_unparseable_time_falls_back() -> None:
    (no_time,) = only_events(orjson.dumps([ce(time=None)]))
    (bad_time,) = only_events(orjson.dumps([ce(time="yesterday")]))
    assert no_time.event_id == bad_time.event_id  # both use "id:" + the CloudEvents id
    assert no_time.occurred_at == ""
    (raw,) = only_events(legacy({"name": "Bill", "id": "1", "operation": "Update", "lastUpdated": "soon"}))
    assert raw.event_id == event_id("123456", "Bill", "1", "Update", "", "raw:soon")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-10-05T14:42:19-0700", "2015-10-05T21:42:19.000Z"),
        ("2019-10-30T15:29:54.000Z", "2019-10-30T15:29:54.000Z"),
        ("2025-09-10T21:31:25.179851517Z", "2025-09-10T21:31:25.179Z"),
        ("2025-12-04T15:25:05Z", "2025-12-04T15:25:05.000Z"),
        ("2025-12-04T15:25:05", "2025-12-04T15:25:05.000Z"),
        ("2025-12-04T15:25:05.1+05:30", "2025-12-04T09:55:05.100Z"),
        ("2025-12-31T23:30:00-01:00", "2026-01-01T00:30:00.000Z"),
        ("2025-02-30T00:00:00Z", None),
        ("2025-02-30T00:00:00.000Z", None),
        ("2025-02-28T24:00:00.000Z", None),
        ("2025-02-28T23:60:00.000Z", None),
        ("2025-02-28T23:00:60.000Z", None),
        ("2025-02-28T23:00:00.\u0661\u0662\u0663Z", None),  # digits, but not ASCII ones
        ("2025-02-28T23:00:00.12xZ", None),
        ("2025-02-28T23:00:00.123z", "2025-02-28T23:00:00.123Z"),
        ("2024-03-01 12:00:00.000Z", "2024-03-01T12:00:00.000Z"),  # the stored shape's length, another separator
        ("2024-03-01t12:00:00.000Z", "2024-03-01T12:00:00.000Z"),
        ("not a time", None),
        ("", None),
    ],
)
def test_utc_instant(text: str, expected: str | None) -> None:
    assert utc_instant(text) == expected


@pytest.mark.parametrize(
    "element",
    [
        pytest.param("a string", id="not-an-object"),
        pytest.param(ce(intuitaccountid=None), id="no-realm"),
        pytest.param(ce(intuitaccountid=123456), id="numeric-realm"),
        pytest.param(ce(intuitaccountid="12a"), id="non-digit-realm"),
        pytest.param(ce(intuitentityid=None), id="no-entity-id"),
        pytest.param(ce(type="qbo.invoice"), id="short-type"),
        pytest.param(ce(type="com.example.invoice.created.v1"), id="foreign-type"),
        pytest.param(ce(type=None), id="no-type"),
    ],
)
def test_malformed_cloudevents_become_invalid_events(element: object) -> None:
    parsed = parse_body(orjson.dumps([element, ce(id="ok")]))
    invalid, good = parsed.items
    assert isinstance(invalid, InvalidEvent)
    assert isinstance(good, Event)
    assert invalid.payload == orjson.dumps(element).decode()


@pytest.mark.parametrize(
    "entity",
    [
        pytest.param({"id": "1", "operation": "Create"}, id="no-name"),
        pytest.param({"name": "Bill", "operation": "Create"}, id="no-id"),
        pytest.param({"name": "Bill", "id": "1"}, id="no-operation"),
        pytest.param([1], id="not-an-object"),
    ],
)
def test_malformed_legacy_entities_become_invalid_events(entity: object) -> None:
    (item,) = parse_body(legacy(entity)).items
    assert isinstance(item, InvalidEvent)
    assert item.realm_id == "123456"


def test_legacy_notification_with_bad_realm_is_invalid() -> None:
    (item,) = parse_body(legacy({"name": "Bill", "id": "1", "operation": "Create"}, realm=42)).items
    assert isinstance(item, InvalidEvent)
    assert item.realm_id == ""


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe[]", id="not-utf8"),
        pytest.param(b"42", id="scalar"),
        pytest.param(b'{"hello":"world"}', id="other-object"),
        pytest.param(b'{"eventNotifications":{}}', id="notifications-not-array"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deep-nesting"),
        pytest.param(b'["\\ud800"]', id="lone-surrogate"),
    ],
)
def test_unparseable_bodies(body: bytes) -> None:
    parsed = parse_body(body)
    assert parsed.unparseable
    assert parsed.items == ()


@pytest.mark.parametrize(
    "body", [b"[]", b'{"eventNotifications":[]}', legacy()], ids=["empty-array", "none", "no-entities"]
)
def test_empty_bodies_have_no_events(body: bytes) -> None:
    parsed = parse_body(body)
    assert not parsed.unparseable
    assert parsed.items == ()
