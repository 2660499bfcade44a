"""Serve an app factory exactly as ``qbo-webhooks serve`` does, so (A) and (B) share one set of uvicorn settings.

``python bench/serve.py MODULE:FACTORY PORT WORKERS`` (started by ``bench/run.py``, pinned by ``taskset``).
"""

from __future__ import annotations

import sys

import uvicorn


def serve(target: str, port: int, workers: int) -> None:
    # The same call as service.cli.cmd_serve, minus the embedded Redis (the bench starts its own).
    uvicorn.run(
        target,
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=max(1, workers),
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
