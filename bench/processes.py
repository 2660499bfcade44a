"""The processes of a benchmark run: core pinning, starting and stopping a server, waiting for a quiet machine."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.procstat import busy_between, cpu_ticks

ROOT = Path(__file__).resolve().parent.parent


def choose_cpus() -> tuple[int | None, int | None, str]:
    """Server on the first allowed core; load generator and redis-server on the second (SPEC §8)."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cpus) < 2:
        note = "NOT pinned (needs taskset and 2 cores): figures are not comparable with pinned runs"
        print(f"warning: {note}", file=sys.stderr)
        return None, None, note
    return cpus[0], cpus[1], f"server on cpu {cpus[0]}; load generator and redis-server on cpu {cpus[1]}"


def wait_for_quiet(limit: float, threshold: float = 0.15) -> None:
    """Wait (up to ``limit`` s) until the machine is nearly idle: other work on these cores skews every figure."""
    deadline = time.monotonic() + limit
    warned = False
    while True:
        before = cpu_ticks()
        time.sleep(1.0)
        busy = sum(busy_between(before, cpu_ticks()).values())
        if busy < threshold:
            return
        if time.monotonic() > deadline:
            print(f"warning: the machine is still busy ({busy:.0%} of a core); measuring anyway", file=sys.stderr)
            return
        if not warned:
            print(f"waiting for other work on this machine to stop ({busy:.0%} of a core busy) ...", file=sys.stderr)
            warned = True


def pinned(cpu: int | None, command: list[str]) -> list[str]:
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.pid = process.pid
        self.port = port
        self.log_tail = ""  # the last lines the server wrote, filled in once it has stopped


@contextmanager
def serving(target: str, workers: int, cpu: int | None, env: dict[str, str]) -> Iterator[Server]:
    port = free_port()
    command = pinned(cpu, [sys.executable, "-m", "bench.serve", target, str(port), str(workers)])
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        server = Server(process, port)
        try:
            wait_ready(process, port, log)
            yield server
        finally:
            stop(process)
            log.seek(0)
            server.log_tail = log.read().decode(errors="replace")[-2000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], port: int, log: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited at start-up:\n{log.read().decode(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn drains and shuts down its workers), then SIGKILL of the server's own process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
