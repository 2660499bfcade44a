"""Handlers the ``consume`` subprocess tests load with ``--handler tests.consume_handlers:handler``.

They record into files under ``$QBO_TEST_HANDLER_DIR``: ``started`` and ``done`` get one line per call
(``<pid> <entry id> <deliveries>``), and a call blocks until a file named ``release`` exists there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.entries import StreamEvent


def handler(event: StreamEvent) -> None:
    """Blocks (in the worker thread the consumer runs plain functions in) until released."""
    directory = Path(os.environ["QBO_TEST_HANDLER_DIR"])
    line = f"{os.getpid()} {event.entry_id} {event.deliveries}\n"
    with (directory / "started").open("a") as out:
        out.write(line)
    while not (directory / "release").exists():
        time.sleep(0.02)
    with (directory / "done").open("a") as out:
        out.write(line)


def lines(directory: Path, name: str) -> list[list[str]]:
    path = directory / name
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []
