"""The embedded Redis shared by the service and CLI commands run from the same directory (SPEC §7)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import redis as redis_sync

from service.embedded import DURABLE_CONFIG, HOST_FRIENDLY_CONFIG, EmbeddedRedis


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_durable_configuration_on_a_unix_socket(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        assert url.startswith("unix://")
        client = redis_sync.Redis.from_url(url, decode_responses=True)
        for name, value in (DURABLE_CONFIG | HOST_FRIENDLY_CONFIG).items():
            assert client.config_get(name) == {name: value}
        assert client.config_get("port") == {"port": "0"}  # no TCP listener
        client.close()
    finally:
        server.release()
    assert not server._answers()


def test_the_last_user_stops_it_and_not_before(tmp_path: Path) -> None:
    first, second = EmbeddedRedis(tmp_path), EmbeddedRedis(tmp_path)
    url = first.start()
    assert second.start() == url
    client = redis_sync.Redis.from_url(url)
    client.set("k", "v")
    first.release()  # the starter is done, but a client is still connected: Redis stays
    assert client.get("k") == b"v"
    client.close()
    second.release()  # the last user: Redis stops
    assert not second._answers()


def test_a_server_whose_owner_died_is_adopted_and_stopped(tmp_path: Path) -> None:
    orphan = EmbeddedRedis(tmp_path)
    orphan.start()
    (orphan.dir / "owner.pid").write_text(str(dead_pid()))  # as if its owner had been killed with SIGKILL
    heir = EmbeddedRedis(tmp_path)
    heir.start()
    assert heir.owned
    heir.release()
    assert not heir._answers()


def test_an_owner_that_exited_but_was_not_yet_reaped_counts_as_dead(tmp_path: Path) -> None:
    # A process killed with SIGKILL stays a zombie until its parent (or a slow init) waits for it: the next
    # command must adopt the server then, not one command later.
    orphan = EmbeddedRedis(tmp_path)
    orphan.start()
    with subprocess.Popen(["true"]) as exited:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{exited.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        (orphan.dir / "owner.pid").write_text(str(exited.pid))
        adopter = EmbeddedRedis(tmp_path)
        try:
            adopter.start()
            assert adopter.owned
            adopter.release()  # the owner is gone and nobody else is connected: the adopter stops it
            assert not adopter._answers()
        finally:
            orphan.stop()


def test_supervise_restarts_a_stopped_server_with_its_data(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    client = redis_sync.Redis.from_url(url)
    client.set("k", "v")
    client.close()
    server.kill()
    assert not server._answers()
    server.supervise()
    client = redis_sync.Redis.from_url(url)
    assert client.get("k") == b"v"  # appendfsync always: the write survived the SIGKILL
    client.close()
    server.release()


def redis_servers_of(server: EmbeddedRedis) -> int:
    """How many live redis-server processes serve this directory's socket."""
    count = 0
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"redis-server" in cmdline and str(server.socket).encode() in cmdline:
            count += 1
    return count


def test_a_stalled_server_is_not_replaced(tmp_path: Path) -> None:
    """A Redis that is slow to answer (fsync stall, long script) is alive: a second one on the same
    append-only file would split the data and corrupt the file."""
    server = EmbeddedRedis(tmp_path)
    server.start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        server.supervise()
        assert server.pid == pid
        assert redis_servers_of(server) == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    server.release()


def test_concurrent_supervisors_restart_one_server(tmp_path: Path) -> None:
    """Two services in one directory both notice that Redis died: exactly one new server starts."""
    first, second = EmbeddedRedis(tmp_path), EmbeddedRedis(tmp_path)
    first.start()
    second.start()
    first.kill()
    threads = [threading.Thread(target=s.supervise) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert redis_servers_of(first) == 1
    assert first._answers()
    first.release()
    second.release()
    assert redis_servers_of(first) == 0
