"""HTTP handlers (SPEC §3): the capped body read, the one table mapping errors to statuses, the summary log line."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import QBOError, SignatureError, StorageUnavailable
from service.ingest import Ingestor, IngestReport
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
# The one place errors become statuses. Never 400 (Intuit would hold back the app's later events) and never 500.
ERROR_ANSWERS: dict[type[BaseException], Answer] = {
    SignatureError: Answer(401, b'{"error":"not authenticated"}', {}),
    BodyTooLarge: Answer(413, b'{"error":"body too large"}', _CLOSE),
    BodyTimeout: Answer(408, b'{"error":"body not received in time"}', _CLOSE),
    ClientDisconnect: Answer(503, b'{"error":"client disconnected"}', _CLOSE),
    StorageUnavailable: Answer(503, b'{"error":"temporarily unavailable"}', _RETRY),
    TimeoutError: Answer(503, b'{"error":"temporarily unavailable"}', _RETRY),
    Exception: Answer(503, b'{"error":"temporarily unavailable"}', _RETRY),
}


def answer_for(exc: BaseException) -> Answer:
    for kind in type(exc).__mro__:
        if kind in ERROR_ANSWERS:
            return ERROR_ANSWERS[kind]
    return ERROR_ANSWERS[Exception]


class Handlers:
    """The routes; ``ingestor`` and ``redis`` are set by the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ingestor: Ingestor | None = None
        self.redis: Redis | None = None

    def routes(self) -> list[Route]:
        path = self.settings.webhook_path
        return [
            Route(path, self.webhook, methods=["POST"]),
            Route(path + "/", self.webhook, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]

    async def webhook(self, request: Request) -> Response:
        started = time.perf_counter()
        request_id = secrets.token_hex(6)
        report: IngestReport | None = None
        error: BaseException | None = None
        try:
            body = await self._read_body(request)
            if self.ingestor is None:
                raise StorageUnavailable("service is starting")
            async with asyncio.timeout(self.settings.response_budget_seconds):
                report = await self.ingestor.ingest(body, request.headers.getlist("intuit-signature"))
        except Exception as exc:
            error = exc
        if error is None and report is not None:
            status = 200
            response = Response(
                orjson.dumps(
                    {
                        "accepted": report.accepted,
                        "duplicates": report.duplicates,
                        "dead_lettered": report.dead_lettered,
                    }
                ),
                200,
                media_type="application/json",
            )
        else:
            assert error is not None
            answer = answer_for(error)
            status = answer.status
            response = Response(answer.body, status, headers=answer.headers, media_type="application/json")
        self._log(request_id, status, report, error, time.perf_counter() - started)
        return response

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge()
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:  # counted as it arrives: Content-Length may be absent or false
                        raise BodyTooLarge()
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyTimeout() from None
        return b"".join(chunks)

    def _log(
        self, request_id: str, status: int, report: IngestReport | None, error: BaseException | None, seconds: float
    ) -> None:
        duration_ms = round(seconds * 1000, 2)
        fields = {"request_id": request_id, "status": status, "duration_ms": duration_ms}
        if report is not None:
            fields.update(
                realms=report.realms,
                accepted=report.accepted,
                duplicates=report.duplicates,
                dead_lettered=report.dead_lettered,
                format=report.format,
            )
        if error is not None:
            fields["reason"] = getattr(error, "reason", type(error).__name__)
        line = " ".join(f"{k}={v}" for k, v in fields.items())
        if error is not None and answer_for(error) is ERROR_ANSWERS[Exception]:
            logger.error("webhook %s", line, extra=fields, exc_info=error)
        elif status >= 500:
            logger.warning("webhook %s detail=%s", line, _short(error), extra=fields)
        else:
            logger.info("webhook %s", line, extra=fields)

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


def _short(error: BaseException | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {str(error)[:160]}"
