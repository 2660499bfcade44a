"""The README's consumer example, run as written against the suite's Redis."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis as redis_sync

from tests.stream_helpers import add_events, make_event, wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def readme_example() -> str:
    match = re.search(r'```python\n("""print_events\.py.*?)```', (ROOT / "README.md").read_text("utf-8"), re.S)
    assert match, "the README has no print_events.py example"
    return match.group(1)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_readme_consumer_example_prints_queued_events(
    redis_url: str, sync_redis: redis_sync.Redis, tmp_path: Path
) -> None:
    script = tmp_path / "print_events.py"
    script.write_text(readme_example(), "utf-8")
    add_events(sync_redis, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QBO_")} | {"QBO_REDIS_URL": redis_url}
    # Ctrl-C as in a terminal, even when the suite itself runs with SIGINT ignored (nohup, a background job):
    # a child inherits an ignored SIGINT, and Python then never raises KeyboardInterrupt.
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=20), "the example printed nothing"
        line = process.stdout.readline().strip()
        wait_for(lambda: int(sync_redis.xpending("qbo:events", "printer")["pending"]) == 0)  # acknowledged
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    event = make_event(1)
    assert line == f"{event.realm_id} Customer 1 Update {event.occurred_at}"
