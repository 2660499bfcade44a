"""Repairing an append-only file whose last write a crash tore, before the embedded Redis loads it.

Every recording call reaches the AOF as one transaction: the script's writes are logged inside
``MULTI``/``EXEC``. Redis loads a torn tail (``aof-load-truncated yes``) by cutting the file after the
last whole *command*, which can leave a ``MULTI`` and part of its writes without ``EXEC``; the server then
appends its next writes after them. After the next crash the file loads with the torn half merged into the
following transaction, and an event whose write was torn (and retried since) is appended a second time.
``redis-check-aof --fix`` cuts before the unfinished ``MULTI`` instead, so the embedded Redis runs it first.
It is the server's own binary run under that name (Redis and Valkey pick the tool by ``argv[0]``).
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

# What the checker reports when the file simply stops in the middle of a write: safe to cut. Anything
# else (a MULTI inside a MULTI, bytes that are not a command) is damage of another kind, where cutting
# would drop the writes that follow it: left to the server and to an operator, and logged.
_TORN_TAIL_ERRORS = ("Expected to read", "Reached EOF before reading EXEC")
_ERROR_LINE = re.compile(r"^0x\s*[0-9a-f]+: (.*)$", re.MULTILINE)
_ANALYZED = re.compile(r"^AOF analyzed: .*$", re.MULTILINE)


def repair_torn_tail(binary: str, redis_dir: Path, appendfilename: str, timeout: float) -> bool:
    """Cut a torn last write off the file Redis appends to; True when something was cut. Never raises:
    a check that cannot run or a file it will not repair is logged, and the server loads the file as it is."""
    target = appended_file(redis_dir, appendfilename)
    if target is None or target.stat().st_size == 0:
        return False
    try:
        check = _check_aof(binary, [str(target)], timeout)
        if check.returncode == 0:
            return False
        if _ANALYZED.search(check.stdout) is None:  # not the checker's report (another binary, a crash)
            logger.error("could not check the append-only file %s: %s", target, (check.stdout + check.stderr)[-300:])
            return False
        errors = _ERROR_LINE.findall(check.stdout)
        if any(not error.startswith(_TORN_TAIL_ERRORS) for error in errors):
            logger.error(
                "the append-only file %s is damaged, not only torn at its end; it is not repaired automatically "
                "(see the README, Operations): %s",
                target,
                " / ".join(errors)[:300],
            )
            return False
        fixed = _check_aof(binary, ["--fix", str(target)], timeout, answer="y\n")
    except (OSError, subprocess.SubprocessError) as exc:
        logger.error("could not check the append-only file %s: %s", target, exc)
        return False
    if fixed.returncode != 0 or "Successfully truncated" not in fixed.stdout:
        logger.error("could not repair the append-only file %s: %s", target, fixed.stdout[-300:])
        return False
    analyzed = _ANALYZED.search(check.stdout)
    logger.warning(
        "cut a write torn by a crash off the end of %s (%s)", target.name, analyzed.group(0) if analyzed else ""
    )
    return True


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


def _check_aof(binary: str, args: list[str], timeout: float, answer: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["redis-check-aof", *args],
        executable=binary,
        input=answer,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
