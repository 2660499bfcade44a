"""The operator commands in-process: dead-letters list/replay/purge, stats, stream trim, consume's handler loading."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import redis as redis_sync

from service import cli
from service.cli_ops import load_handler
from service.signature import fingerprint
from tests.helpers import dead_letters, events, register
from tests.stream_helpers import DEAD, EVENTS, add_events

REALM = "9130350000000099"
TOKEN = "cli-test-token"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, redis_url: str, sync_redis: redis_sync.Redis) -> None:
    for name in ("QBO_KEY_PREFIX", "QBO_ENCRYPTION_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QBO_REDIS_URL", redis_url)
    # main() installs its own log handler on the root logger; keep pytest's.
    monkeypatch.setattr("service.logs.configure", lambda *args, **kwargs: None)


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    return int(exit_info.value.code or 0)


def add_letter(r: redis_sync.Redis, reason: str, **fields: str) -> str:
    entry: dict[Any, Any] = {"v": "1", "reason": reason, "realm_id": "", "payload": "{}", **fields}
    return str(r.xadd(DEAD, entry))


def test_dead_letters_list_prints_json_lines_filtered_by_reason(
    sync_redis: redis_sync.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    first = add_letter(sync_redis, "unparseable")
    add_letter(sync_redis, "token_mismatch")
    assert run_cli("dead-letters", "list", "--reason", "unparseable") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {"id": first, "v": "1", "reason": "unparseable", "realm_id": "", "payload": "{}"}


@pytest.mark.parametrize(
    ("argv", "answer", "code", "left"),
    [
        (("--reason", "unparseable"), "n\n", 1, ["unparseable", "token_mismatch"]),
        (("--reason", "unparseable"), "", 1, ["unparseable", "token_mismatch"]),
        (("--reason", "unparseable"), "y\n", 0, ["token_mismatch"]),
        (("--reason", "unparseable", "--yes"), "", 0, ["token_mismatch"]),
        (("--yes",), "", 0, []),
    ],
    ids=["answered-no", "no-answer", "answered-yes", "yes-flag", "everything"],
)
def test_dead_letters_purge_asks_first(
    sync_redis: redis_sync.Redis,
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    answer: str,
    code: int,
    left: list[str],
) -> None:
    add_letter(sync_redis, "unparseable")
    add_letter(sync_redis, "token_mismatch")
    monkeypatch.setattr("sys.stdin", io.StringIO(answer))
    assert run_cli("dead-letters", "purge", *argv) == code
    assert [letter["reason"] for letter in dead_letters(sync_redis)] == left


def test_dead_letters_replay_prints_what_was_replayed_and_refused(
    sync_redis: redis_sync.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = '{"name":"Customer","id":"5","operation":"Create","lastUpdated":"2026-03-01T10:00:00Z"}'
    queued = add_letter(sync_redis, "unknown_realm", realm_id=REALM, verified_by=fingerprint(TOKEN), payload=payload)
    refused = add_letter(sync_redis, "unknown_realm", realm_id="123", verified_by=fingerprint(TOKEN), payload=payload)
    register(sync_redis, REALM, TOKEN)
    assert run_cli("dead-letters", "replay", "--reason", "unknown_realm") == 1  # one was refused
    out, err = capsys.readouterr()
    outcomes = {o["letter_id"]: o for o in map(json.loads, out.splitlines())}
    assert outcomes[queued]["status"] == "queued"
    assert outcomes[refused] | {"entry_id": ""} == {
        "letter_id": refused,
        "reason": "unknown_realm",
        "status": "refused",
        "detail": "realm 123 is not registered",
        "entry_id": "",
    }
    assert "1 queued, 1 refused" in err
    assert len(events(sync_redis)) == 1

    assert run_cli("dead-letters", "replay", "--id", queued) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "gone"


def test_stats_prints_json(sync_redis: redis_sync.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    add_events(sync_redis, 2)
    sync_redis.xgroup_create(EVENTS, "billing", "0")
    add_letter(sync_redis, "unparseable")
    assert run_cli("stats") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["length"] == 2
    assert [(g["name"], g["lag"]) for g in stats["groups"]] == [("billing", 2)]
    assert stats["dead_letters"]["by_reason"] == {"unparseable": 1}


def test_stream_trim_reports_what_it_did(sync_redis: redis_sync.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    ids = add_events(sync_redis, 3)
    assert run_cli("stream", "trim") == 0
    assert "nothing trimmed" in capsys.readouterr().out
    sync_redis.xgroup_create(EVENTS, "billing", ids[1])  # entries 1 and 2 count as delivered and acknowledged
    assert run_cli("stream", "trim") == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert sync_redis.xlen(EVENTS) == 1


@pytest.mark.parametrize(
    "spec", ["tests.consume_handlers", "no.such.module:handler", "tests.consume_handlers:missing", "json:__doc__"]
)
def test_consume_refuses_a_handler_it_cannot_load(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("consume", "--group", "g", "--handler", spec) == 2
    assert "cannot load handler" in capsys.readouterr().err


def test_load_handler_resolves_module_and_attribute() -> None:
    from tests.consume_handlers import handler

    assert load_handler("tests.consume_handlers:handler") is handler


def test_stream_delete_group_unblocks_trim(
    sync_redis: redis_sync.Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for n in range(3):
        sync_redis.xadd(EVENTS, {"v": "1", "n": str(n)})
    sync_redis.xgroup_create(EVENTS, "abandoned", id="0")
    sync_redis.xgroup_create(EVENTS, "current", id="$")
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert run_cli("stream", "delete-group", "abandoned") == 1
    assert run_cli("stream", "trim") == 0
    assert "removed 0" in capsys.readouterr().out
    assert run_cli("stream", "delete-group", "abandoned", "--yes") == 0
    assert run_cli("stream", "trim") == 0
    assert "removed 3" in capsys.readouterr().out
    assert sync_redis.xlen(EVENTS) == 0
    assert run_cli("stream", "delete-group", "abandoned", "--yes") == 1
    assert "no consumer group" in capsys.readouterr().err
