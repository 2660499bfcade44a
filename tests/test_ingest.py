"""The use case against a real Redis: deliveries of one event-loop turn settled together from the cache,
and the same outcome whichever path (cached or general) a delivery takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from service.connections import ConnectionStore
from service.crypto import SecretBox
from service.errors import SignatureError
from service.ingest import Ingestor, IngestReport
from service.keys import Keys
from service.queue import StreamRecorder
from service.signature import sign
from tests.helpers import entries
from tests.test_http import ce_body

TOKENS = {"111": "token-one", "222": "token-two", "333": "token-one"}


@dataclass
class Wiring:
    ingestor: Ingestor
    store: ConnectionStore
    keys: Keys


@pytest.fixture
async def wire(redis: Redis, sync_redis: redis_sync.Redis) -> AsyncIterator[Callable[[str], Wiring]]:
    """An ingestor per key prefix, with the realms of ``TOKENS`` registered under it."""
    recorders: list[StreamRecorder] = []

    def make(prefix: str) -> Wiring:
        keys = Keys(prefix)
        for realm, token in TOKENS.items():
            sync_redis.hset(keys.connection(realm), mapping={"realm_id": realm, "webhook_verifier_token": token})
        store = ConnectionStore(redis, keys, SecretBox(()))
        recorders.append(StreamRecorder(redis, keys))
        return Wiring(Ingestor(store, recorders[-1]), store, keys)

    yield make
    for recorder in recorders:
        await recorder.close()


def delivery(realms: list[str], entity: str, token: str, *, invalid: bool = False) -> tuple[bytes, list[str]]:
    elements: list[Any] = [orjson.loads(ce_body(realm, f"{entity}-{realm}"))[0] for realm in realms]
    if invalid:
        elements.append({"specversion": "1.0", "intuitaccountid": realms[0]})  # no entity id: a dead letter
    body = orjson.dumps(elements)
    return body, [sign(token, body)]


DELIVERIES = [
    ("one realm", delivery(["111"], "a", "token-one")),
    ("two realms, one app", delivery(["111", "333"], "b", "token-one")),
    ("an invalid element", delivery(["222"], "c", "token-two", invalid=True)),
    ("cross-tenant", delivery(["111", "222"], "d", "token-one")),  # 222's event is not 111's app's to send
    ("forged", (ce_body("222", "e"), [sign("not-the-token", ce_body("222", "e"))])),
    ("the same again", delivery(["111"], "a", "token-one")),
]


async def outcomes(ingestor: Ingestor) -> list[IngestReport | str]:
    """Every delivery of ``DELIVERIES`` at once, in one turn of the event loop."""
    results = await asyncio.gather(*(ingestor.ingest(*d) for _, d in DELIVERIES), return_exceptions=True)
    return [r if isinstance(r, IngestReport) else type(r).__name__ for r in results]


def stored(sync_redis: redis_sync.Redis, keys: Keys) -> list[list[tuple[str, str]]]:
    """Entries of both streams without their ids and receive times, for comparing two runs (in any order)."""
    return sorted(
        sorted((k, v) for k, v in fields.items() if k != "received_at")
        for stream in (keys.events, keys.dead_letters)
        for _, fields in entries(sync_redis, stream)
    )


async def test_cached_and_general_paths_give_the_same_outcome(
    wire: Callable[[str], Wiring], sync_redis: redis_sync.Redis
) -> None:
    cold, warm = wire("cold"), wire("warm")
    await warm.store.routes(list(TOKENS))  # every realm cached: the batch settles what it can without Redis reads
    assert warm.store.cached(list(TOKENS)) is not None
    assert cold.store.cached(list(TOKENS)) is None
    warm_outcomes = await outcomes(warm.ingestor)
    cold_outcomes = await outcomes(cold.ingestor)
    # The first and the last delivery carry the same event. The batch writes in arrival order; on the general
    # path each delivery first reads its routes, so which copy is written first depends on which read returns
    # first. One of the two is accepted and the other is its duplicate either way.
    first, *middle, last = cold_outcomes
    assert middle == warm_outcomes[1:-1]
    assert sorted([repr(first), repr(last)]) == sorted([repr(warm_outcomes[0]), repr(warm_outcomes[-1])])
    assert [o if isinstance(o, str) else (o.accepted, o.duplicates, o.dead_lettered) for o in warm_outcomes] == [
        (1, 0, 0),
        (2, 0, 0),
        (1, 0, 1),
        (1, 0, 1),
        "SignatureError",
        (0, 1, 0),
    ]
    reasons = [o.reasons for o in warm_outcomes if not isinstance(o, str)]
    assert reasons == [{}, {}, {"invalid_event": 1}, {"token_mismatch": 1}, {}]
    assert stored(sync_redis, warm.keys) == stored(sync_redis, cold.keys)


async def test_a_turn_of_deliveries_is_written_in_one_call(
    wire: Callable[[str], Wiring], sync_redis: redis_sync.Redis
) -> None:
    wired = wire("turn")
    await wired.store.routes(list(TOKENS))
    bodies = [delivery(["111"], f"n{n}", "token-one") for n in range(40)]
    sync_redis.config_resetstat()
    reports = await asyncio.gather(*(wired.ingestor.ingest(*body) for body in bodies))
    assert [r.accepted for r in reports] == [1] * 40
    assert sync_redis.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
    assert sync_redis.xlen(wired.keys.events) == 40


async def test_a_delivery_cancelled_before_its_turn_writes_nothing(
    wire: Callable[[str], Wiring], sync_redis: redis_sync.Redis
) -> None:
    wired = wire("cancel")
    await wired.store.routes(list(TOKENS))
    task = asyncio.create_task(wired.ingestor.ingest(*delivery(["111"], "x", "token-one")))
    await asyncio.sleep(0)  # the delivery joins the pending list
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert sync_redis.xlen(wired.keys.events) == 0
    report = await wired.ingestor.ingest(*delivery(["111"], "x", "token-one"))  # Intuit's retry is then new
    assert report.accepted == 1


async def test_malformed_signature_headers_are_refused_before_the_turn(wire: Callable[[str], Wiring]) -> None:
    wired = wire("malformed")
    with pytest.raises(SignatureError):
        await wired.ingestor.ingest(ce_body("111"), ["not base64!"])
