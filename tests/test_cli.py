"""The CLI in process: signing, connections, configuration errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import redis as redis_sync
from redis.client import NEVER_DECODE

from service.cli import main
from tests.helpers import FIXTURES, REAL_SIGNATURE, REAL_TOKEN, SAMPLE_SIGNATURE, SAMPLE_TOKEN


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.mark.parametrize(
    ("token", "name", "signature"),
    [
        (REAL_TOKEN, "legacy-real-signed.json", REAL_SIGNATURE),
        (SAMPLE_TOKEN, "cloudevents-intuit-sample.json", SAMPLE_SIGNATURE),
    ],
    ids=["legacy", "cloudevents"],
)
def test_sign_prints_the_known_answer(
    capsys: pytest.CaptureFixture[str], token: str, name: str, signature: str
) -> None:
    code, out, _ = run(capsys, "sign", "--token", token, str(FIXTURES / name))
    assert (code, out.strip()) == (0, signature)


def test_connections_put_show_list_delete(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str, sync_redis: redis_sync.Redis
) -> None:
    monkeypatch.setenv("QBO_REDIS_URL", redis_url)
    code, out, err = run(capsys, "connections", "put", "77", "--verifier-token", "vt-secret", "--client-secret", "cs")
    assert code == 2
    assert "--allow-plaintext" in err
    code, out, _ = run(capsys, "connections", "put", "77", "--verifier-token", "vt-secret", "--client-id", "app-1")
    assert code == 0
    assert json.loads(out) == {"client_id": "app-1", "realm_id": "77", "webhook_verifier_token": "********"}
    code, out, _ = run(capsys, "connections", "show", "77")
    assert "vt-secret" not in out
    code, out, _ = run(capsys, "connections", "show", "77", "--reveal")
    assert json.loads(out)["webhook_verifier_token"] == "vt-secret"
    assert run(capsys, "connections", "list")[1].split() == ["77"]
    assert run(capsys, "connections", "delete", "77")[0] == 0
    assert run(capsys, "connections", "show", "77")[0] == 1
    assert sync_redis.exists("qbo:connection:77") == 0


def test_a_connection_holding_a_value_that_is_not_utf8_can_be_shown_updated_and_deleted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str, sync_redis: redis_sync.Redis
) -> None:
    # Another writer's binary OAuth session blob: shown without it, kept byte for byte by a put that does not set it.
    monkeypatch.setenv("QBO_REDIS_URL", redis_url)
    key = "qbo:connection:99"
    sync_redis.hset(key, mapping={"webhook_verifier_token": "vt-99", "oauth_session_data": b"\x80\x04\xff", "x": "1"})
    sync_redis.expire(key, 600)  # another writer's expiry: a connection we register must not inherit it
    code, out, _ = run(capsys, "connections", "show", "99", "--reveal")
    assert (code, json.loads(out)) == (0, {"webhook_verifier_token": "vt-99"})
    assert run(capsys, "connections", "put", "99", "--environment", "production")[0] == 0
    raw = sync_redis.execute_command("HGETALL", key, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
    assert raw == {
        b"webhook_verifier_token": b"vt-99",
        b"oauth_session_data": b"\x80\x04\xff",  # kept byte for byte; the unknown field "x" is not
        b"environment": b"production",
        b"realm_id": b"99",
    }
    assert sync_redis.ttl(key) == -1
    assert run(capsys, "connections", "delete", "99")[0] == 0
    assert sync_redis.exists(key) == 0


def test_a_json_string_connection_that_is_not_utf8_is_not_overwritten_but_can_be_deleted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str, sync_redis: redis_sync.Redis
) -> None:
    monkeypatch.setenv("QBO_REDIS_URL", redis_url)
    key = "qbo:connection:98"
    stored = b'{"webhook_verifier_token":"vt-98","blob":"\xff"}'
    sync_redis.set(key, stored)
    assert run(capsys, "connections", "show", "98")[0] == 1
    code, _, err = run(capsys, "connections", "put", "98", "--environment", "production")
    assert code == 2
    assert "not overwritten" in err
    assert sync_redis.execute_command("GET", key, **{NEVER_DECODE: True}) == stored  # type: ignore[no-untyped-call]
    assert run(capsys, "connections", "delete", "98")[0] == 0
    assert sync_redis.exists(key) == 0
    sync_redis.rpush(key, "another writer's list")  # any other type is not overwritten either
    assert run(capsys, "connections", "put", "98", "--environment", "production")[0] == 2
    assert sync_redis.type(key) == "list"


def test_put_reads_json_and_rejects_bad_realm_ids(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    sync_redis: redis_sync.Redis,
    tmp_path: pytest.TempPathFactory,
) -> None:
    monkeypatch.setenv("QBO_REDIS_URL", redis_url)
    source = tmp_path / "conn.json"  # type: ignore[operator]
    session = {"state": "s", "pkce": True}
    fields = {"webhook_verifier_token": "vt", "environment": "production", "unknown": 1, "oauth_session_data": session}
    source.write_text(json.dumps(fields))
    assert run(capsys, "connections", "put", "88", "--from-json", str(source))[0] == 0
    assert sync_redis.hgetall("qbo:connection:88") == {
        "webhook_verifier_token": "vt",
        "environment": "production",
        "oauth_session_data": '{"state":"s","pkce":true}',  # JSON text, not Python's repr
        "realm_id": "88",
    }
    assert run(capsys, "connections", "put", "x88", "--verifier-token", "vt")[0] == 2
    for bad in (b"{not json", b'{"webhook_verifier_token": "\xff"}'):
        source.write_bytes(bad)
        code, _, err = run(capsys, "connections", "put", "88", "--from-json", str(source))
        assert code == 2
        assert "cannot read --from-json" in err
    code, _, err = run(capsys, "connections", "put", "88", "--from-json", str(source) + ".missing")
    assert (code, "cannot read --from-json" in err) == (2, True)


def test_invalid_configuration_stops_with_one_line_per_field(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QBO_PORT", "eighty")
    monkeypatch.setenv("QBO_RESPONSE_BUDGET_SECONDS", "0")
    code, _, err = run(capsys, "connections", "list")
    assert code == 2
    assert "QBO_PORT:" in err
    assert "QBO_RESPONSE_BUDGET_SECONDS:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "url",
    ["http://localhost:6379", "localhost:6379", "redis://:hunter2-secret@localhost:not-a-port"],
    ids=["http", "no-scheme", "bad-port"],
)
def test_serve_refuses_a_redis_url_it_cannot_use_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("QBO_REDIS_URL", url)
    code, _, err = run(capsys, "serve")
    assert code == 2
    assert [line.strip().split(":")[0] for line in err.splitlines()[1:]] == ["QBO_REDIS_URL"], err
    assert "hunter2-secret" not in err
    assert "Traceback" not in err


def test_a_reader_that_closed_the_pipe_stops_the_command_quietly() -> None:
    # As `qbo-webhooks sign ... | head -c0` would: the read end is closed before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service", "sign", "--token", REAL_TOKEN, str(FIXTURES / "legacy-real-signed.json")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""
