"""The app factory: wires settings, Redis, the connection store, the recorder and the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import compiled, logs
from service.client import check_durability, make_redis
from service.connections import ConnectionStore
from service.crypto import SecretBox
from service.embedded import EmbeddedRedis
from service.http import ERROR_ANSWERS, Handlers, route_path
from service.ingest import Ingestor
from service.keys import Keys
from service.queue import StreamRecorder
from service.settings import Settings, load_settings

logger = logging.getLogger(__name__)

TOKEN_INDEX_REBUILD_SECONDS = 300.0
GC_YOUNG_THRESHOLD = 10_000


def create_app(settings: Settings | None = None, *, redis: Redis | None = None) -> Starlette:
    """Build the ASGI app. Without ``redis`` the lifespan connects to ``settings.redis_url`` (or starts
    the embedded Redis) and closes what it opened on shutdown."""
    settings = settings or load_settings()
    if not logging.getLogger().handlers:
        # A process where nobody set up logging: a worker of `serve --workers N` (uvicorn spawns each one afresh
        # and passes no logging configuration), or another ASGI server importing the factory.
        logs.configure(settings.log_level, settings.log_format)
    handlers = Handlers(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:  # closes what was opened, even if start-up fails
            _log_compiled_state()
            client = redis if redis is not None else await _open_redis(settings, stack)
            await check_durability(client, require=settings.require_durable)
            keys = Keys(settings.key_prefix)
            store = ConnectionStore(
                client,
                keys,
                SecretBox(settings.fernet_keys),
                cache_seconds=settings.connection_cache_seconds,
                retired_token_days=settings.retired_token_days,
            )
            recorder = StreamRecorder(
                client,
                keys,
                dedupe_ttl_seconds=settings.dedupe_ttl_seconds,
                dead_letter_maxlen=settings.dead_letter_maxlen,
                min_replicas=settings.min_replicas,
                replica_timeout_seconds=settings.response_budget_seconds / 2,
                call_timeout_seconds=settings.response_budget_seconds,
            )
            stack.push_async_callback(_bounded, recorder.close(), "waiting for queued writes")
            with contextlib.suppress(RedisError):  # Redis may be down at start-up; scripts then load on first use
                await store.preload()
                await recorder.preload()
            await _rebuild_once(store, limit_seconds=10.0)  # bodies naming no known realm need the index
            handlers.redis = client
            handlers.ingestor = Ingestor(
                store, recorder, app_tokens=settings.app_tokens, budget_seconds=settings.response_budget_seconds
            )
            handlers.metrics.gauges_from = [("decrypt_failures", store), ("dead_letter_cap_reached", recorder)]
            stack.callback(setattr, handlers, "ingestor", None)
            for job in (_write_metrics(handlers), _keep_token_index(store), store.follow_changes()):
                stack.push_async_callback(_cancel, asyncio.get_running_loop().create_task(job))
            if handlers.metrics_files is not None:
                stack.callback(handlers.metrics_files.write, handlers.metrics)
            # What start-up allocated lives as long as the process: keep it out of the collector's scans, which
            # otherwise show up as pauses in the latency tail under load.
            gc.freeze()
            # A delivery allocates a few hundred short-lived objects that reference counting frees; with the
            # default young-generation threshold (700) the requests in flight alone trigger a collection
            # every few requests, about 3 µs of CPU per request (bench/). Cycles are still collected.
            stack.callback(gc.set_threshold, *gc.get_threshold())
            gc.set_threshold(GC_YOUNG_THRESHOLD)
            yield

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Reached only if something escaped a handler; the traceback is logged, never shown.
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        answer = ERROR_ANSWERS[Exception]
        return Response(answer.body, answer.status, headers=answer.headers, media_type="application/json")

    app = ReceiverApp(
        handlers.webhook,
        {settings.webhook_path, settings.webhook_path + "/"},
        routes=handlers.routes(),
        lifespan=lifespan,
        exception_handlers={Exception: internal_error},
    )
    app.router.redirect_slashes = False
    return app


class ReceiverApp(Starlette):
    """Starlette, with deliveries dispatched to the webhook endpoint ahead of the middleware stack.

    The endpoint answers every error itself (it never raises), so the error middlewares had nothing to
    do for it; skipping them and the router saves a noticeable share of each delivery's CPU time. Every
    other request, including other methods on the webhook path (405), goes through Starlette as usual.
    """

    def __init__(self, webhook: ASGIApp, webhook_paths: set[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._webhook = webhook
        self._webhook_paths = frozenset(webhook_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and route_path(scope) in self._webhook_paths:
            await self._webhook(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _log_compiled_state() -> None:
    states = compiled.state()
    level = logging.WARNING if "stale" in states.values() else logging.INFO
    logger.log(level, "hot-path modules: %s", compiled.summary())


async def _open_redis(settings: Settings, stack: contextlib.AsyncExitStack) -> Redis:
    """A client for ``QBO_REDIS_URL``, or for the embedded Redis started here (both closed by ``stack``)."""
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = await asyncio.to_thread(embedded.start)
        stack.push_async_callback(asyncio.to_thread, embedded.release)
        logger.info(
            "embedded Redis (%s) at %s, data in %s; set QBO_REDIS_URL to use your own Redis",
            embedded.binary or "already running",
            embedded.url,
            embedded.dir,
        )
    client = make_redis(url, timeout=settings.response_budget_seconds)
    stack.push_async_callback(_bounded, client.aclose(), "closing the Redis client")
    return client


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await _bounded(asyncio.gather(task, return_exceptions=True), f"stopping {task.get_coro()!r}")


SHUTDOWN_STEP_SECONDS = 5.0


async def _bounded(step: Awaitable[object], what: str) -> None:
    """One shutdown step, given up (and logged) after a few seconds: shutdown must finish."""
    try:
        await asyncio.wait_for(step, SHUTDOWN_STEP_SECONDS)
    except TimeoutError:
        logger.error("shutdown: gave up %s after %.0f s", what, SHUTDOWN_STEP_SECONDS)


async def _write_metrics(handlers: Handlers) -> None:
    """With several workers, publish this worker's counts for the others' /metrics (about once a second)."""
    if handlers.metrics_files is None:
        return
    while True:
        try:
            await asyncio.to_thread(handlers.metrics_files.write, handlers.metrics)
        except OSError as exc:
            logger.warning("cannot write metrics file: %s", exc)
        await asyncio.sleep(1.0)


async def _keep_token_index(store: ConnectionStore) -> None:
    """Keep the known-token index current with connections written by others (SPEC §4.4)."""
    while True:
        await asyncio.sleep(TOKEN_INDEX_REBUILD_SECONDS)
        await _rebuild_once(store, limit_seconds=TOKEN_INDEX_REBUILD_SECONDS)


async def _rebuild_once(store: ConnectionStore, *, limit_seconds: float) -> None:
    try:
        async with asyncio.timeout(limit_seconds):
            count = await store.rebuild_token_index()
        logger.debug("verifier-token index rebuilt: %d tokens", count)
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("verifier-token index rebuild failed (%s); retrying later", type(exc).__name__)
    except Exception:
        logger.exception("verifier-token index rebuild failed")
