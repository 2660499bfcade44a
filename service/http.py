"""HTTP handlers (SPEC §3): the capped body read, the one table mapping errors to statuses, the summary log line.

The webhook route is a plain ASGI endpoint mounted on a Starlette ``Route`` (which still answers 405 to
other methods): building ``Request``/``Response`` objects cost more per delivery than the rest of the
Python work on the hot path, and the route reads only the body and one header.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.deadlines import Deadlines
from service.errors import QBOError, SignatureError, StorageUnavailable
from service.ingest import Ingestor, IngestReport
from service.metrics import Metrics, MetricsFiles, merge, render
from service.settings import Settings

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "10"


class BodyTooLarge(QBOError):
    pass


class BodyTimeout(QBOError):
    pass


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


_CLOSE = {"connection": "close"}
_RETRY = {"retry-after": RETRY_AFTER_SECONDS}
_UNAVAILABLE = b'{"error":"temporarily unavailable"}'
# The one place errors become statuses. Never 400 (Intuit would hold back the app's later events) and never 500.
ERROR_ANSWERS: dict[type[BaseException], Answer] = {
    SignatureError: Answer(401, b'{"error":"not authenticated"}', {}),
    BodyTooLarge: Answer(413, b'{"error":"body too large"}', _CLOSE),
    BodyTimeout: Answer(408, b'{"error":"body not received in time"}', _CLOSE),
    ClientDisconnect: Answer(503, b'{"error":"client disconnected"}', _CLOSE),
    StorageUnavailable: Answer(503, _UNAVAILABLE, _RETRY),
    TimeoutError: Answer(503, _UNAVAILABLE, _RETRY),
    Exception: Answer(503, _UNAVAILABLE, _RETRY),
}


def answer_for(exc: BaseException) -> Answer:
    for kind in type(exc).__mro__:
        if kind in ERROR_ANSWERS:
            return ERROR_ANSWERS[kind]
    return ERROR_ANSWERS[Exception]


class Webhook:
    """``POST`` of Intuit's deliveries: read the body (capped, timed), ingest it within the budget, answer."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ingestor: Ingestor | None = None
        self._ids = itertools.count(1)
        self._deadlines = Deadlines()
        self._id_prefix = os.urandom(3).hex()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        number = next(self._ids)
        report: IngestReport | None = None
        error: BaseException | None = None
        reading = True
        task: asyncio.Task[object] = asyncio.current_task()  # type: ignore[assignment]
        try:
            self._deadlines.set(task, self.settings.body_timeout_seconds)
            signatures, declared = _headers(scope)
            body = await self._read_body(receive, declared)
            reading = False
            self._deadlines.set(task, self.settings.response_budget_seconds)
            if self.ingestor is None:
                raise StorageUnavailable("service is starting")
            report = await self.ingestor.ingest(body, signatures)
        except asyncio.CancelledError:
            if not self._deadlines.clear(task):
                raise  # cancelled from outside (shutdown, client gone): not ours to answer
            task.uncancel()
            error = BodyTimeout() if reading else TimeoutError("response budget exceeded")
        except Exception as exc:
            error = exc
        finally:
            self._deadlines.clear(task)
        if report is not None:
            status = 200
            payload = b'{"accepted":%d,"duplicates":%d,"dead_lettered":%d}' % (
                report.accepted,
                report.duplicates,
                report.dead_lettered,
            )
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
        else:
            assert error is not None
            answer = answer_for(error)
            status, payload = answer.status, answer.body
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
            headers.extend((k.encode(), v.encode()) for k, v in answer.headers.items())
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        seconds = time.perf_counter() - started
        self._count(status, seconds, report, error)
        self._log(number, status, report, error, seconds)

    def _count(self, status: int, seconds: float, report: IngestReport | None, error: BaseException | None) -> None:
        metrics = self.metrics
        if isinstance(error, ClientDisconnect):
            metrics.errors["client_disconnected"] += 1  # nobody got an answer: not a 503 served
            return
        metrics.observe(status, seconds)
        if report is not None:
            if report.accepted:
                metrics.events["accepted"] += report.accepted
            if report.duplicates:
                metrics.events["duplicate"] += report.duplicates
            for reason, count in report.reasons.items():
                metrics.events[reason] += count
        elif isinstance(error, SignatureError):
            metrics.signature_failures[error.reason] += 1
        elif error is not None:
            metrics.errors[_cause(error)] += 1

    async def _read_body(self, receive: Receive, declared: int | None) -> bytes:
        limit = self.settings.max_body_bytes
        if declared is not None and declared > limit:
            raise BodyTooLarge()
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body: bytes = message.get("body", b"")  # the whole body in one message: the usual case
            if len(body) > limit:
                raise BodyTooLarge()
            return body
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # counted as it arrives: Content-Length may be absent or false
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            message = await receive()

    def _log(
        self, number: int, status: int, report: IngestReport | None, error: BaseException | None, seconds: float
    ) -> None:
        unexpected = error is not None and answer_for(error) is ERROR_ANSWERS[Exception]
        served_error = status >= 500 and not isinstance(error, ClientDisconnect)
        level = logging.ERROR if unexpected else logging.WARNING if served_error else logging.INFO
        if not logger.isEnabledFor(level):
            return
        request_id = f"{self._id_prefix}-{number:x}"
        fields: dict[str, Any] = {"request_id": request_id, "status": status, "duration_ms": round(seconds * 1000, 2)}
        if report is not None:
            fields.update(realms=report.realms, accepted=report.accepted, duplicates=report.duplicates,
                          dead_lettered=report.dead_lettered, format=report.format)  # fmt: skip
            if report.reasons:
                fields["reasons"] = ",".join(f"{k}:{v}" for k, v in sorted(report.reasons.items()))
        if error is not None:
            fields["reason"] = getattr(error, "reason", type(error).__name__)
        line = " ".join(f"{k}={v}" for k, v in fields.items())
        if unexpected:
            logger.error("webhook %s", line, extra=fields, exc_info=error)
        elif served_error:
            logger.warning("webhook %s detail=%s", line, _short(error), extra=fields)
        else:
            logger.info("webhook %s", line, extra=fields)


def _headers(scope: Scope) -> tuple[list[str], int | None]:
    """Every ``intuit-signature`` value (names arrive lower-cased) and the declared Content-Length."""
    signatures: list[str] = []
    declared: int | None = None
    for name, value in scope["headers"]:
        if name == b"intuit-signature":
            signatures.append(value.decode("latin-1"))
        elif name == b"content-length" and value.isdigit():
            declared = int(value)
    return signatures, declared


def route_path(scope: Scope) -> str:
    """The request path below the app's root path (as Starlette's routing sees it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class Handlers:
    """The routes; the lifespan sets ``redis`` and the webhook's ``ingestor``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics_files = MetricsFiles(settings.metrics_dir) if settings.metrics_dir else None
        self.webhook = Webhook(settings, self.metrics)
        self.redis: Redis | None = None

    @property
    def ingestor(self) -> Ingestor | None:
        return self.webhook.ingestor

    @ingestor.setter
    def ingestor(self, value: Ingestor | None) -> None:
        self.webhook.ingestor = value

    def routes(self) -> list[Route]:
        path = self.settings.webhook_path
        return [
            Route(path, self.webhook, methods=["POST"]),
            Route(path + "/", self.webhook, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]

    async def metrics_endpoint(self, request: Request) -> Response:
        if self.metrics_files is not None:
            snapshot = await asyncio.to_thread(self.metrics_files.read_all, self.metrics)
        else:
            snapshot = merge([self.metrics.snapshot()])
        return Response(render(snapshot), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(self, request: Request) -> Response:
        try:
            if self.redis is None:
                raise StorageUnavailable("not started")
            async with asyncio.timeout(min(1.0, self.settings.response_budget_seconds)):
                await self.redis.ping()
        except (RedisError, TimeoutError, StorageUnavailable, OSError):
            return Response(b'{"status":"redis unavailable"}', 503, headers=_RETRY, media_type="application/json")
        return Response(b'{"status":"ready"}', media_type="application/json")


def _cause(error: BaseException) -> str:
    if isinstance(error, StorageUnavailable):
        return "redis"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, BodyTimeout | BodyTooLarge | ClientDisconnect):
        return "body"
    return "internal"


def _short(error: BaseException | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {str(error)[:160]}"
