"""Real processes for end-to-end tests: the service under uvicorn over TCP, and raw HTTP over a socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import WEBHOOK

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``python -m service serve --port P`` with ``QBO_REDIS_URL`` set; its log goes to a file."""

    def __init__(self, redis_url: str | None, log_dir: Path, *, port: int | None = None, **settings: str) -> None:
        self.port = port or free_port()
        self.redis_url = redis_url
        self.log_path = log_dir / f"service-{self.port}.log"
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK}"

    def start(self, timeout: float = 20.0) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QBO_")}
        env["QBO_LOG_LEVEL"] = "INFO"
        if self.redis_url is None:  # the embedded Redis, under the log directory
            env["QBO_DATA_DIR"] = str(self.log_path.parent / "data")
        else:
            env["QBO_REDIS_URL"] = self.redis_url
        env.update({f"QBO_{name.upper()}": value for name, value in self.settings.items()})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited at start-up:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                if http_request(self.port, "GET", "/healthz", timeout=1.0).status == 200:
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"service did not answer within {timeout:.0f} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def terminate(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    timeout: float = 10.0,
) -> Answer:
    """One HTTP/1.1 request on a fresh connection, headers exactly as given (plus host, length, close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request_head(method, path, len(body), headers) + body)
        return read_answer(sock)


def request_head(method: str, path: str, length: int | None, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
    if length is not None:
        lines.append(f"content-length: {length}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_answer(sock: socket.socket) -> Answer:
    """Read a whole response (the server closes the connection after it); ``ValueError`` if none came."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            # A server that answers before reading the whole request (413, 400) may reset the connection
            # after its answer when unread bytes remain; the answer already received still counts.
            break
        if not chunk:
            break
        data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.1 "):
        raise ValueError(f"no HTTP answer (got {len(data)} bytes)")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split(" ")[1]), headers, body)
