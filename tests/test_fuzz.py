"""Bad-input campaign (hypothesis) through the real ASGI app and a real Redis.

Whatever the body and headers: never a 500, never a traceback, only the documented answers; nothing is
written unless the body verified, and an event reaches ``qbo:events`` only if it verified with *its
realm's own* token. Bodies are sometimes signed with a registered token, so the authenticated parse and
routing path is fuzzed too: then the answer is predicted from SPEC §4 (200 or 401) and, on 200, every
element of the body is accounted for (accepted + duplicates + dead-lettered).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.http import ERROR_ANSWERS
from service.payloads import parse_body
from service.signature import sign
from tests.helpers import WEBHOOK, register

TOKENS = {"111": "fuzz-token-a", "222": "fuzz-token-b"}
UNKNOWN_TOKEN = "fuzz-token-nobody-registered"
CAP = 16 * 1024
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
ERROR_BODIES = {answer.body for answer in ERROR_ANSWERS.values()}
RUNS: Counter[str] = Counter()  # generated inputs per test, printed at the end of each


# -- strategies ---------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)  # beyond 64 bits and beyond a double's integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["111", "222", "999", "0111", "", " 111", "\uff11\uff11\uff11", "qbo.customer.updated.v1"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
realm_ids = st.sampled_from(["111", "222", "999"]) | json_values


def any_or(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field either right or of any shape at all."""
    return good | json_values


@st.composite
def cloudevent(draw: st.DrawFn) -> Any:
    fields = {
        "specversion": any_or(st.just("1.0")),
        "id": any_or(st.uuids().map(str)),
        "source": any_or(st.just("intuit.fuzz")),
        "type": any_or(
            st.builds(
                "qbo.{}.{}.v{}".format,
                st.sampled_from(["customer", "invoice", "changeorder", "x" * 40, ""]),
                st.sampled_from(["created", "updated", "merged", "void", "exploded"]),
                st.integers(0, 10**6),
            )
        ),
        "time": any_or(st.sampled_from(["2026-03-01T10:00:00Z", "2015-10-05T14:42:19-0700", "yesterday", ""])),
        "intuitentityid": any_or(st.text(min_size=1, max_size=10)),
        "intuitaccountid": realm_ids,
        "data": any_or(st.fixed_dictionaries({"deletedId": st.text(max_size=5)})),
    }
    element = {name: draw(value) for name, value in fields.items() if draw(st.integers(0, 9)) > 0}
    return element if draw(st.integers(0, 9)) > 0 else draw(json_values)  # now and then not an object at all


@st.composite
def legacy(draw: st.DrawFn) -> Any:
    entity = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "name": any_or(st.sampled_from(["Customer", "Invoice", "ChangeOrder"])),
                "id": any_or(st.text(min_size=1, max_size=8)),
                "operation": any_or(st.sampled_from(["Create", "Update", "Merge", "Explode"])),
                "lastUpdated": any_or(st.just("2015-10-05T14:42:19-0700")),
                "deletedId": json_values,
            },
        )
    )
    entities = draw(any_or(st.lists(any_or(st.just(entity)), max_size=4)))
    change = draw(any_or(st.fixed_dictionaries({"entities": st.just(entities)})))
    notification = draw(any_or(st.fixed_dictionaries({"realmId": realm_ids, "dataChangeEvent": st.just(change)})))
    notifications = draw(any_or(st.lists(st.just(notification), max_size=3)))
    return {"eventNotifications": notifications}


payload_documents = legacy() | cloudevent() | st.lists(cloudevent(), max_size=6)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A payload-shaped document, then damaged the way the wire damages things."""
    text = json.dumps(draw(payload_documents), ensure_ascii=draw(st.booleans()))
    kind = draw(st.sampled_from(["none", "bom", "bad-utf8", "duplicate-key", "deep", "truncate", "trailing", "ws"]))
    body = text.encode("utf-8", "surrogatepass")
    if kind == "bom":
        body = b"\xef\xbb\xbf" + body
    elif kind == "bad-utf8":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + body[at:]
    elif kind == "duplicate-key":
        body = body.replace(b"{", b'{"intuitaccountid":"222","realmId":"222",', 1)
    elif kind == "deep":
        depth = draw(st.integers(1, 3000))
        body = b"[" * depth + body + b"]" * depth
    elif kind == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif kind == "trailing":
        body += draw(st.binary(min_size=1, max_size=8))
    elif kind == "ws":
        body = b" \t\r\n" + body + b"\n"
    return body


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=20).filter(
    lambda name: name not in {"content-length", "host", "transfer-encoding", "intuit-signature", "connection"}
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300) | st.just(
    "v" * 12000
)


# -- the oracle ---------------------------------------------------------------------------------------


def expected_status(body: bytes, signer: str | None, twice: bool) -> int:
    """What SPEC §3/§4 say the answer must be."""
    if len(body) > CAP:
        return 413
    if signer is None or twice:
        return 401
    candidates = {TOKENS[realm] for realm in parse_body(body).realm_ids() if realm in TOKENS}
    return 200 if signer in (candidates or set(TOKENS.values())) else 401


def element_count(body: bytes) -> int:
    parsed = parse_body(body)
    return 1 if parsed.unparseable else len(parsed.items)


class Campaign:
    def __init__(self, client: TestClient, r: redis_sync.Redis, caplog: pytest.LogCaptureFixture, name: str) -> None:
        self.client, self.r, self.caplog, self.name = client, r, caplog, name
        self.statuses: Counter[int] = Counter()

    def send(self, body: bytes, signer: str | None, headers: list[tuple[str, str]], *, twice: bool = False) -> None:
        RUNS[self.name] += 1
        sent = list(headers)
        if signer is not None:
            sent += [("intuit-signature", sign(signer, body))] * (2 if twice else 1)
        events_before = int(self.r.xlen("qbo:events"))
        dead_before = int(self.r.xlen("qbo:events:dead"))
        self.caplog.clear()
        response = self.client.post(WEBHOOK, content=body, headers=sent)
        self.statuses[response.status_code] += 1
        new_events = int(self.r.xlen("qbo:events")) - events_before
        new_letters = int(self.r.xlen("qbo:events:dead")) - dead_before

        assert response.status_code == expected_status(body, signer, twice), (response.status_code, body[:200])
        assert b"Traceback" not in response.content
        assert b'File "' not in response.content
        assert not [rec for rec in self.caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
        if response.status_code != 200:
            assert response.content in ERROR_BODIES
            assert (new_events, new_letters) == (0, 0), "written without a valid signature"
            return
        counts = response.json()
        assert set(counts) == {"accepted", "duplicates", "dead_lettered"}
        assert counts["accepted"] + counts["duplicates"] + counts["dead_lettered"] == element_count(body)
        assert (new_events, new_letters) == (counts["accepted"], counts["dead_lettered"])
        if new_events:
            added: list[tuple[str, dict[str, str]]] = self.r.xrevrange("qbo:events", count=new_events)  # type: ignore[assignment]
            # The invariant: only events of realms whose own token signed the body.
            assert {TOKENS.get(fields["realm_id"]) for _, fields in added} == {signer}


@pytest.fixture
def campaign(
    request: pytest.FixtureRequest,
    client_factory: Callable[..., Any],
    sync_redis: redis_sync.Redis,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Campaign]:
    for realm, token in TOKENS.items():
        register(sync_redis, realm, token)  # before start-up: the start-up rebuild indexes both tokens
    caplog.set_level(logging.INFO)
    with client_factory(max_body_bytes=CAP) as client:
        run = Campaign(client, sync_redis, caplog, request.node.name)
        yield run
    with capsys.disabled():
        print(f"\n{run.name}: {RUNS[run.name]} generated inputs, statuses {dict(sorted(run.statuses.items()))}")
    assert RUNS[run.name] > 0
    assert 500 not in run.statuses


signers = st.sampled_from([None, *TOKENS.values(), UNKNOWN_TOKEN])


def test_arbitrary_bytes(campaign: Campaign) -> None:
    @FUZZ
    @given(body=st.binary(max_size=2000), size=st.sampled_from([None, None, None, CAP, CAP + 1]), signer=signers)
    def run(body: bytes, size: int | None, signer: str | None) -> None:
        if size is not None:  # just at and just over the cap
            body = (body + b"\x00" * size)[:size]
        campaign.send(body, signer, [])

    run()


def test_arbitrary_json(campaign: Campaign) -> None:
    @FUZZ
    @given(document=json_values, signer=signers)
    def run(document: Any, signer: str | None) -> None:
        campaign.send(json.dumps(document).encode("utf-8", "surrogatepass"), signer, [])

    run()


def test_payload_shaped_documents(campaign: Campaign) -> None:
    @settings(FUZZ, max_examples=500)
    @given(document=payload_documents, signer=signers)
    def run(document: Any, signer: str | None) -> None:
        campaign.send(_dumps(document), signer, [])

    run()


def test_damaged_payloads(campaign: Campaign) -> None:
    @settings(FUZZ, max_examples=400)
    @given(body=mutated(), signer=signers)
    def run(body: bytes, signer: str | None) -> None:
        campaign.send(body, signer, [])

    run()


def test_arbitrary_headers(campaign: Campaign) -> None:
    @FUZZ
    @given(
        document=payload_documents,
        signer=signers,
        twice=st.booleans(),
        headers=st.lists(st.tuples(header_names, header_values), max_size=30),
        raw_signature=st.none() | header_values | st.binary(min_size=32, max_size=32).map(bytes.hex),
    )
    def run(
        document: Any, signer: str | None, twice: bool, headers: list[tuple[str, str]], raw_signature: str | None
    ) -> None:
        if raw_signature is not None and signer is None:
            headers = [*headers, ("intuit-signature", raw_signature)]
        campaign.send(_dumps(document), signer, headers, twice=twice and signer is not None)

    run()


def _dumps(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8", "surrogatepass")
