"""Test helpers: fixture bodies with their known signatures, connection registration, signed POSTs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import redis as redis_sync
from starlette.testclient import TestClient

from service.signature import sign

FIXTURES = Path(__file__).parent / "fixtures"
REAL_TOKEN = "43c97e5c-99f9-4cb2-82ee-ce64ce90b751"
REAL_SIGNATURE = "HmuXsvKpPUvvUQbu6PT766iNcZZ9SekX+CES5b0e7y4="
SAMPLE_TOKEN = "test-verifier-token-0000"
SAMPLE_SIGNATURE = "AnLzktE7m+9frUis6Jjz4qL9Yl2SzFGSX6rbFNUOHTs="
WEBHOOK = "/webhooks/quickbooks"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def register(r: redis_sync.Redis, realm_id: str, token: str | None, environment: str = "sandbox") -> None:
    """Write a connection hash the way our CLI does (plain text, no keys configured)."""
    fields: dict[Any, Any] = {"realm_id": realm_id, "environment": environment}
    if token is not None:
        fields["webhook_verifier_token"] = token
    r.delete(f"qbo:connection:{realm_id}")
    r.hset(f"qbo:connection:{realm_id}", mapping=fields)


def post(client: TestClient, body: bytes, token: str | None = None, **headers: str) -> Any:
    """POST a body as Intuit does; signed with ``token`` unless an explicit signature header is given."""
    sent = {"content-type": "application/cloudevents-batch+json; charset=utf-8"}
    if token is not None:
        sent["intuit-signature"] = sign(token, body)
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    return client.post(WEBHOOK, content=body, headers=sent)


def entries(r: redis_sync.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return cast("list[tuple[str, dict[str, str]]]", r.xrange(stream))


def hash_of(r: redis_sync.Redis, key: str) -> dict[str, str]:
    return cast("dict[str, str]", r.hgetall(key))


def events(r: redis_sync.Redis) -> list[dict[str, str]]:
    return [fields for _, fields in entries(r, "qbo:events")]


def dead_letters(r: redis_sync.Redis) -> list[dict[str, str]]:
    return [fields for _, fields in entries(r, "qbo:events:dead")]
