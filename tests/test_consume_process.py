"""``qbo-webhooks consume`` as a real process: kill -9 mid-handler, restart, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from tests.consume_handlers import lines
from tests.helpers import dead_letters
from tests.stream_helpers import EVENTS, add_events, pending_count, wait_for

ROOT = Path(__file__).resolve().parent.parent
GROUP = "workers"

pytestmark = pytest.mark.slow


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBO_")}
    env.update(QBO_REDIS_URL=redis_url, QBO_TEST_HANDLER_DIR=str(tmp_path), QBO_LOG_LEVEL="DEBUG")

    def start() -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "service", "consume", "--group", GROUP, "--claim-idle", "0.5"]
        command += ["--handler", "tests.consume_handlers:handler"]
        with (tmp_path / f"worker-{len(processes)}.log").open("wb") as log:  # a file: a full pipe would block it
            process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=log)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_a_worker_killed_mid_handler_leaves_its_entry_to_the_restarted_worker(
    start_worker: Callable[[], subprocess.Popen[bytes]], sync_redis: redis_sync.Redis, tmp_path: Path
) -> None:
    (entry_id,) = add_events(sync_redis, 1)
    first = start_worker()
    wait_for(lambda: len(lines(tmp_path, "started")) == 1)
    first.kill()  # SIGKILL, mid-handler
    first.wait(10)
    assert pending_count(sync_redis, GROUP) == 1  # not acknowledged without a successful handler
    assert lines(tmp_path, "done") == []

    (tmp_path / "release").touch()
    second = start_worker()
    wait_for(lambda: pending_count(sync_redis, GROUP) == 0)
    assert lines(tmp_path, "started") == [[str(first.pid), entry_id, "1"], [str(second.pid), entry_id, "2"]]
    assert lines(tmp_path, "done") == [[str(second.pid), entry_id, "2"]]
    assert dead_letters(sync_redis) == []
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0


def test_sigterm_drains_the_running_handler_and_reads_nothing_new(
    start_worker: Callable[[], subprocess.Popen[bytes]], sync_redis: redis_sync.Redis, tmp_path: Path
) -> None:
    (entry_id,) = add_events(sync_redis, 1)
    worker = start_worker()
    wait_for(lambda: len(lines(tmp_path, "started")) == 1)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert worker.poll() is None  # still draining: the handler has not returned
    add_events(sync_redis, 1, first=2)
    (tmp_path / "release").touch()
    assert worker.wait(15) == 0
    assert lines(tmp_path, "done") == [[str(worker.pid), entry_id, "1"]]
    assert pending_count(sync_redis, GROUP) == 0
    (group,) = sync_redis.xinfo_groups(EVENTS)
    assert group["last-delivered-id"] == entry_id  # the entry added after SIGTERM was not read
