"""Repairing an append-only file whose last write a crash tore, before the embedded Redis loads it.

Every recording call reaches the AOF as one transaction: the script's writes are logged inside
``MULTI``/``EXEC``. Redis loads a torn tail (``aof-load-truncated yes``) by cutting the file after the
last whole *command*, which can leave a ``MULTI`` and part of its writes without ``EXEC``; the server then
appends its next writes after them. After the next crash the file loads with the torn half merged into the
following transaction, and an event whose write was torn (and retried since) is appended a second time.

So before the server starts, the file it appends to is cut before an unfinished write: the server's own
``redis-check-aof`` (its binary under that name) scans the file in C and reports where the valid part ends;
the bytes from there are then read here and cut only if they are exactly one unfinished write running to the
end of the file (a ``MULTI`` with whole commands and no ``EXEC``, and/or one command cut short). Anything
else is damage of another kind, where a cut would drop the writes after it: logged, left alone.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_OK_UP_TO = re.compile(r"^AOF analyzed: .*?ok_up_to=(\d+)", re.MULTILINE)
_PARTIAL_LINE = re.compile(rb"[*$]\d*\r?")
_BOUNDARY = re.compile(rb"\r\n\*1\r\n\$(?:5\r\nMULTI|4\r\nEXEC)\r\n", re.IGNORECASE)
_MAX_ARGS = 1 << 24
_MAX_BULK = 1 << 30


class _Damaged(Exception):
    """Bytes that are not the beginning of a command."""


class _Cut(Exception):
    """The file ends inside a command."""


def repair_torn_tail(binary: str, redis_dir: Path, appendfilename: str, timeout: float) -> bool:
    """Cut a torn last write off the file Redis appends to; True when something was cut. Never raises:
    a check that cannot run or a file it will not repair is logged, and the server loads the file as it is."""
    deadline = time.monotonic() + timeout
    try:
        target = appended_file(redis_dir, appendfilename)
        if target is None or target.stat().st_size == 0:
            return False
        check = subprocess.run(
            ["redis-check-aof", str(target)],
            executable=binary,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
        if check.returncode == 0:
            return False
        reported = _OK_UP_TO.search(check.stdout)
        # Without a report (a checker that took the file for something else), the file is scanned here.
        start = int(reported.group(1)) if reported else 0
        with target.open("rb") as handle:
            handle.seek(start)
            cut = unfinished_write(handle, deadline)
        if cut is None or (reported is not None and cut != start):
            logger.error(
                "the append-only file %s is damaged, not only torn at its end; it is not repaired automatically "
                "(see the README, Operations): %s",
                target,
                check.stdout.strip().replace("\n", " / ")[-300:],
            )
            return False
        size = target.stat().st_size
        os.truncate(target, cut)
    except Exception as exc:  # a best-effort repair: the server still decides how to load the file
        logger.error("could not check the append-only file under %s: %s: %s", redis_dir, type(exc).__name__, exc)
        return False
    logger.warning("cut a write torn by a crash off the end of %s (%d of %d bytes kept)", target.name, cut, size)
    return True


def unfinished_write(handle: BinaryIO, deadline: float = float("inf")) -> int | None:
    """Scan whole commands from ``handle``'s position; the offset where an unfinished write begins, which runs
    to the end of the file, or ``None`` when there is none or the bytes are damaged (not commands)."""
    in_multi = False
    start = handle.tell()
    commands = 0
    while True:
        if not in_multi:
            start = handle.tell()
        commands += 1
        if commands % 4096 == 0 and time.monotonic() > deadline:
            raise TimeoutError("scanning the append-only file took too long")
        try:
            name = _command_name(handle)
        except _Cut:
            return start
        except _Damaged:
            return None
        if name is None:  # the end of the file, between commands
            return start if in_multi else None
        if name == b"MULTI":
            if in_multi:
                return None
            in_multi = True
        elif name == b"EXEC":
            if not in_multi:
                return None
            in_multi = False


def _command_name(handle: BinaryIO) -> bytes | None:
    """Read one whole command; its upper-cased name, ``None`` at the end of the file."""
    head = handle.readline(32)
    if not head:
        return None
    count = _length(head, b"*", 1, _MAX_ARGS)
    name = b""
    for index in range(count):
        size = _length(handle.readline(32), b"$", 0, _MAX_BULK)
        value = handle.read(size)
        if len(value) < size:
            # Cut inside a value, or a damaged length that swallowed the rest of the file: a value holding
            # a whole transaction boundary of the file is the second.
            raise _Damaged() if _BOUNDARY.search(value) else _Cut()
        end = handle.read(2)
        if end != b"\r\n":
            raise _Cut() if b"\r\n".startswith(end) else _Damaged()
        if index == 0:
            name = value.upper()
    return name


def _length(line: bytes, prefix: bytes, least: int, most: int) -> int:
    """The number of a ``*N`` or ``$N`` line."""
    if not line.endswith(b"\r\n"):
        if not line or (len(line) < 32 and _PARTIAL_LINE.fullmatch(line) and line[:1] == prefix):
            raise _Cut()  # the file ends inside this line (a shorter read means the end of the file)
        raise _Damaged()
    digits = line[1:-2]
    if line[:1] != prefix or not digits.isascii() or not digits.isdigit() or not least <= int(digits) <= most:
        raise _Damaged()
    return int(digits)


def appended_file(redis_dir: Path, appendfilename: str) -> Path | None:
    """The file a server of ``redis_dir`` appends to: Redis 7's last incremental file (named by the manifest
    in ``appendonlydir``), or Redis 6's single file. ``None`` when there is none yet."""
    manifest = redis_dir / "appendonlydir" / f"{appendfilename}.manifest"
    if manifest.exists():
        last = None
        for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            entry = dict(zip(fields[::2], fields[1::2], strict=False))
            if entry.get("type") == "i" and "file" in entry:
                last = manifest.parent / entry["file"]
        return last if last is not None and last.exists() else None
    single = redis_dir / appendfilename
    return single if single.exists() else None
