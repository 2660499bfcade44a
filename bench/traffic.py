"""Benchmark traffic: tenants and pre-generated, correctly signed deliveries, as raw HTTP/1.1 requests.

Pure and deterministic (a seed in, the same bytes out), so the load generator and the tests agree on
what was sent. Every event is unique (entity ids come from one counter), so dedupe never short-circuits.
"""

from __future__ import annotations

import random
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from service.signature import sign

ENTITIES = ("Customer", "Invoice", "Payment", "Bill", "SalesReceipt", "JournalEntry", "Vendor", "Item")
OPERATIONS = (("Create", "created"), ("Update", "updated"), ("Delete", "deleted"), ("Void", "void"))
_BASE_TIME = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Tenant:
    realm_id: str
    token: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """One signed POST body and what the service should make of it."""

    body: bytes
    signature: str
    content_type: str
    events: int
    format: str


def make_tenants(realms: int, tokens: int, seed: int = 1) -> list[Tenant]:
    """``realms`` registered companies spread over ``tokens`` Intuit apps (verifier tokens)."""
    rng = random.Random(seed)
    secrets = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(1, tokens))]
    # Realm ids are digit strings beyond 2**53, as real ones are.
    return [Tenant(str(9_130_355_000_000_000_000 + i * 7919), secrets[i % len(secrets)]) for i in range(realms)]


def generate(
    count: int,
    tenants: Sequence[Tenant],
    *,
    seed: int = 1,
    legacy_share: float = 0.3,
    max_batch: int = 5,
) -> Iterator[Delivery]:
    """``count`` deliveries: a ``legacy_share`` of legacy single-event bodies, the rest CloudEvents batches of
    1 to ``max_batch`` events, each batch naming realms of one app (one token signs the whole body)."""
    rng = random.Random(seed)
    by_token: dict[str, list[str]] = {}
    for tenant in tenants:
        by_token.setdefault(tenant.token, []).append(tenant.realm_id)
    tokens = sorted(by_token)
    serial = 0
    for _ in range(count):
        token = rng.choice(tokens)
        realms = by_token[token]
        if rng.random() < legacy_share:
            serial += 1
            body = _legacy(rng.choice(realms), serial, rng)
            yield Delivery(body, sign(token, body), "application/json", 1, "legacy")
        else:
            size = rng.randint(1, max_batch)
            batch = []
            for _ in range(size):
                serial += 1
                batch.append(_cloudevent(rng.choice(realms), serial, rng))
            body = orjson.dumps(batch)
            yield Delivery(
                body, sign(token, body), "application/cloudevents-batch+json; charset=utf-8", size, "cloudevents"
            )


def _stamp(serial: int) -> str:
    """A distinct millisecond per event, written as Intuit does (``2019-10-30T15:29:54.000Z``)."""
    when = _BASE_TIME + timedelta(milliseconds=serial)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _legacy(realm_id: str, serial: int, rng: random.Random) -> bytes:
    operation, _ = rng.choice(OPERATIONS)
    entity = {
        "name": rng.choice(ENTITIES),
        "id": str(serial),
        "operation": operation,
        "lastUpdated": _stamp(serial),
    }
    document = {"eventNotifications": [{"realmId": realm_id, "dataChangeEvent": {"entities": [entity]}}]}
    return orjson.dumps(document)


def _cloudevent(realm_id: str, serial: int, rng: random.Random) -> dict[str, Any]:
    _, verb = rng.choice(OPERATIONS)
    return {
        "specversion": "1.0",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "source": "intuit.bench",
        "type": f"qbo.{rng.choice(ENTITIES).lower()}.{verb}.v1",
        "datacontenttype": "application/json",
        "time": _stamp(serial),
        "intuitentityid": str(serial),
        "intuitaccountid": realm_id,
        "data": {},
    }


def http_request(delivery: Delivery, path: str, host: str = "127.0.0.1") -> bytes:
    """The exact bytes of the POST Intuit would send for ``delivery`` (keep-alive HTTP/1.1)."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"host: {host}\r\n"
        "user-agent: qbo-bench\r\n"
        f"content-type: {delivery.content_type}\r\n"
        f"content-length: {len(delivery.body)}\r\n"
        f"intuit-signature: {delivery.signature}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + delivery.body


def write_pool(path: Path, requests: Iterable[bytes]) -> int:
    """Store raw requests, each prefixed by its length; returns how many were written."""
    written = 0
    with path.open("wb") as out:
        for request in requests:
            out.write(_LENGTH.pack(len(request)))
            out.write(request)
            written += 1
    return written


def read_pool(path: Path) -> list[bytes]:
    """The raw requests ``write_pool`` stored, in order."""
    data = path.read_bytes()
    requests: list[bytes] = []
    position = 0
    while position < len(data):
        (length,) = _LENGTH.unpack_from(data, position)
        position += _LENGTH.size
        requests.append(data[position : position + length])
        position += length
    return requests
