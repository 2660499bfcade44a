"""(A) of the benchmark: the floor the service is compared with.

A bare Starlette app on the same path, served by the same uvicorn settings: it reads the whole body and
answers 200 with a small JSON body, and does nothing else.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PATH = "/webhooks/quickbooks"


async def _receive(request: Request) -> Response:
    await request.body()
    return Response(b'{"accepted":0,"duplicates":0,"dead_lettered":0}', media_type="application/json")


async def _healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def create_app() -> Starlette:
    """The uvicorn factory (``bench.bare:create_app``)."""
    return Starlette(
        routes=[
            Route(PATH, _receive, methods=["POST"]),
            Route(PATH + "/", _receive, methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
        ]
    )
