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
        assert repair(tmp_path) is False
    assert (tmp_path / APPENDFILENAME).read_bytes() == NESTED
    assert "damaged" in caplog.text


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


WHOLE = resp(b"SET", b"a", b"b") + resp(b"MULTI") + resp(b"SET", b"c", b"") + resp(b"SET", b"d", b"e") + resp(b"EXEC")
TRANSACTION = resp(b"MULTI") + resp(b"SET", b"t1", b"x") + resp(b"SET", b"t2", b"x") + resp(b"EXEC")
SINGLE = resp(b"SET", b"s", b"some value")


def repair(directory: Path, binary: str | None = None) -> bool:
    return repair_torn_tail(binary or find_redis_server(), directory, APPENDFILENAME, 10.0)


def test_a_whole_file_or_no_file_is_left_alone(tmp_path: Path) -> None:
    assert repair(tmp_path) is False  # nothing yet
    (tmp_path / APPENDFILENAME).write_bytes(WHOLE)
    assert repair(tmp_path) is False
    assert (tmp_path / APPENDFILENAME).read_bytes() == WHOLE


@pytest.mark.parametrize("last", [TRANSACTION, SINGLE], ids=["transaction", "single command"])
def test_a_write_torn_at_any_byte_is_cut_whole(tmp_path: Path, last: bytes) -> None:
    """Wherever the crash stopped the last write (inside a length line, a value, between commands), exactly
    the whole writes before it are kept."""
    path = tmp_path / APPENDFILENAME
    for length in range(1, len(last)):
        path.write_bytes(WHOLE + last[:length])
        repair(tmp_path)
        assert path.read_bytes() == WHOLE, (length, last[:length])


def test_damage_inside_the_file_is_never_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cut at damage in the middle would drop the whole writes after it: logged, left as it is."""
    path = tmp_path / APPENDFILENAME
    for damaged in (
        WHOLE + b"\n" + TRANSACTION,
        WHOLE + b"\xff" + TRANSACTION,
        WHOLE + resp(b"SET", b"x", b"y")[:-1] + b"?" + TRANSACTION,
        WHOLE + b"$-1\r\n" + TRANSACTION,
        WHOLE + resp(b"SET", b"x", b"y").replace(b"$1\r\ny", b"$9999\r\ny") + TRANSACTION,  # swallows the rest
        WHOLE + b"\x00" * 64,
        WHOLE + NESTED,
    ):
        path.write_bytes(damaged)
        with caplog.at_level(logging.ERROR, logger="service.aof"):
            assert repair(tmp_path) is False
        assert path.read_bytes() == damaged


def test_a_value_the_checker_misreads_does_not_stop_the_repair(tmp_path: Path) -> None:
    """Redis 7's checker takes a file with a line starting "file" for a manifest; the file is then scanned here."""
    path = tmp_path / APPENDFILENAME
    whole = WHOLE + resp(b"MULTI") + resp(b"SET", b"note", b"file uploaded") + resp(b"EXEC")
    path.write_bytes(whole + TORN)
    assert repair(tmp_path) is True
    assert path.read_bytes() == whole


def test_without_a_checker_the_file_is_scanned_here(tmp_path: Path) -> None:
    false = shutil.which("false")
    assert false is not None
    path = tmp_path / APPENDFILENAME
    path.write_bytes(WHOLE + TORN)
    assert repair(tmp_path, false) is True
    assert path.read_bytes() == WHOLE
    path.write_bytes(WHOLE + b"\xff" + TORN)
    assert repair(tmp_path, false) is False
    assert path.read_bytes() == WHOLE + b"\xff" + TORN
