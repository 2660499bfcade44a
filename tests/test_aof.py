"""A write torn by a crash is cut off the append-only file before the embedded Redis loads it (service/aof.py).

Redis itself cuts a torn tail only after the last whole command, which can leave half a transaction in the
file; the next crash then replays that half with the transaction after it (the chaos test once found an
event appended twice that way). These tests run against the suite's redis-server binary (6.2 or 7.x).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import redis as redis_sync

from service.aof import appended_file, repair_torn_tail
from service.embedded import APPENDFILENAME, EmbeddedRedis, find_redis_server

TWO_WRITES = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1])"
# A transaction whose write a crash tore: MULTI and one whole SET reached the disk, the next command did not.
TORN = b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$4\r\ntorn\r\n$1\r\nx\r\n*3\r\n$3\r\nSE"
NESTED = (  # half a transaction followed by a whole one: what Redis's own cut leaves once more writes came
    b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$4\r\ntorn\r\n$1\r\nx\r\n"
    b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$4\r\nnext\r\n$1\r\ny\r\n*1\r\n$4\r\nEXEC\r\n"
)


def test_a_torn_transaction_never_comes_back_after_the_next_crash(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    try:
        client = redis_sync.Redis.from_url(server.start(), decode_responses=True)
        client.eval(TWO_WRITES, 2, "first:1", "first:2", "1")
        client.close()
        server.stop()
        target = appended_file(server.dir, APPENDFILENAME)
        assert target is not None
        with target.open("ab") as handle:
            handle.write(TORN)

        client = redis_sync.Redis.from_url(server.start(), decode_responses=True)
        assert client.get("torn") is None
        client.eval(TWO_WRITES, 2, "second:1", "second:2", "2")  # appended after whatever the tear left
        client.close()
        server.kill()  # a second crash: the next start loads the file as written since

        client = redis_sync.Redis.from_url(server.start(), decode_responses=True)
        assert client.get("torn") is None  # without the repair, the torn SET is applied with the next transaction
        assert client.mget("first:1", "first:2", "second:1", "second:2") == ["1", "1", "2", "2"]
        client.close()
        assert "can not be nested" not in (server.dir / "redis.log").read_text(errors="replace")
    finally:
        server.stop()


def test_a_file_damaged_otherwise_is_left_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Cutting at an inner MULTI would drop every write after it: that file is logged, never cut."""
    (tmp_path / APPENDFILENAME).write_bytes(NESTED)
    with caplog.at_level(logging.ERROR, logger="service.aof"):
        assert repair_torn_tail(find_redis_server(), tmp_path, APPENDFILENAME, 10.0) is False
    assert (tmp_path / APPENDFILENAME).read_bytes() == NESTED
    assert "damaged" in caplog.text


def test_a_whole_file_or_no_file_is_left_alone(tmp_path: Path) -> None:
    assert repair_torn_tail(find_redis_server(), tmp_path, APPENDFILENAME, 10.0) is False  # nothing yet
    whole = b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\nb\r\n*1\r\n$4\r\nEXEC\r\n"
    (tmp_path / APPENDFILENAME).write_bytes(whole)
    assert repair_torn_tail(find_redis_server(), tmp_path, APPENDFILENAME, 10.0) is False
    assert (tmp_path / APPENDFILENAME).read_bytes() == whole


def test_a_torn_tail_is_cut_before_its_multi(tmp_path: Path) -> None:
    whole = b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\nb\r\n"
    (tmp_path / APPENDFILENAME).write_bytes(whole + TORN)
    assert repair_torn_tail(find_redis_server(), tmp_path, APPENDFILENAME, 10.0) is True
    assert (tmp_path / APPENDFILENAME).read_bytes() == whole


def test_a_binary_that_is_not_redis_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / APPENDFILENAME).write_bytes(TORN)
    false = shutil.which("false")
    assert false is not None
    with caplog.at_level(logging.ERROR, logger="service.aof"):
        assert repair_torn_tail(false, tmp_path, APPENDFILENAME, 10.0) is False
    assert (tmp_path / APPENDFILENAME).read_bytes() == TORN
