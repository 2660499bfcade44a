"""Cross-check of the load generator: the same bare app driven by ``wrk`` (a C load generator) on the same core.

If the Python generator (``bench.load``) reaches about the rate wrk reaches against the bare app, then the
bare app (the fastest thing measured) is what limits both, and the generator is not the bottleneck.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def ensure_wrk() -> str | None:
    """``wrk`` on PATH; if missing, one attempt to install Debian's package (as root); else explain and give up."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("wrk not found: trying `apt-get install -y wrk` ...", file=sys.stderr, flush=True)
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
        found = shutil.which("wrk")
        if found:
            return found
    print(
        "note: wrk is not installed and could not be installed here (Debian: `apt-get install wrk`, as root, "
        "after `apt-get update`); the wrk cross-check of the load generator is skipped",
        file=sys.stderr,
    )
    return None


def lua_script(request: bytes) -> str:
    """A wrk script that sends the method, headers and body of one raw HTTP request (a bare-app load)."""
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    text = body.decode("utf-8")
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    out = [f'wrk.method = "{method}"', f"wrk.body = [{eq}[{text}]{eq}]"]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() not in ("host", "content-length"):  # wrk sets both itself
            out.append(f'wrk.headers["{name}"] = "{value.strip()}"')
    return "\n".join(out) + "\n"


def parse_output(text: str) -> dict[str, Any]:
    """Requests/s, p50/p99 (ms) and errors from ``wrk --latency`` output."""
    result: dict[str, Any] = {"requests_per_second": 0.0, "latency_ms": {}, "non_2xx": 0, "socket_errors": 0}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rate:
        result["requests_per_second"] = float(rate.group(1))
    for percent, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE):
        result["latency_ms"][f"p{percent}"] = float(value) * _UNITS[unit]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non_2xx:
        result["non_2xx"] = int(non_2xx.group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if errors:
        result["socket_errors"] = sum(int(n) for n in errors.groups())
    return result


def run_wrk(
    wrk: str, request: bytes, port: int, path: str, connections: int, duration: float, cpu: int | None, tmp: Path
) -> dict[str, Any]:
    script = tmp / "bare.lua"
    script.write_text(lua_script(request), encoding="utf-8")
    command = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script)]
    command.append(f"http://127.0.0.1:{port}{path}")
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-500:]}
    return parse_output(done.stdout)
