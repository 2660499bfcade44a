"""``qbo-webhooks``: the one command for serving, registering connections, signing and test deliveries."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import __version__, cli_keys, cli_sim, logs
from service.client import check_durability, make_redis
from service.connections import ConnectionStore
from service.crypto import SecretBox
from service.embedded import EmbeddedRedis
from service.errors import QBOError
from service.keys import Keys
from service.models import ConnectionMetadata
from service.payloads import VERB_BY_OPERATION
from service.settings import Settings, load_settings
from service.signature import sign

logger = logging.getLogger("service.cli")

Command = Callable[[argparse.Namespace, Settings], Awaitable[int] | int]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script; the only place that calls ``sys.exit``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        logs.configure(settings.log_level, settings.log_format)
        result = args.command(args, settings)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
        sys.stdout.flush()  # here, so that a closed pipe (`| head`) is caught below rather than at exit
    except BrokenPipeError:
        # The reader went away (`qbo-webhooks stats | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
    except QBOError as exc:
        print(f"qbo-webhooks: {exc}", file=sys.stderr)
        code = 2
    except RedisError as exc:  # no secret in it: redis-py's messages name the address, never the password
        print(f"qbo-webhooks: Redis is unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 3
    except KeyboardInterrupt:
        code = 130
    sys.exit(int(code or 0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbo-webhooks", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the webhook endpoint (embedded Redis when QBO_REDIS_URL is unset)")
    serve.add_argument("--host", help="bind address (default QBO_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default QBO_PORT, 8000)")
    serve.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    serve.set_defaults(command=cmd_serve)

    conns = sub.add_parser("connections", help="register, show, list and delete realm connections")
    conn_sub = conns.add_subparsers(required=True, metavar="ACTION")
    put = conn_sub.add_parser("put", help="create or update a realm's connection (given fields are merged)")
    put.add_argument("realm_id")
    put.add_argument("--verifier-token", dest="webhook_verifier_token", help="the app's webhook verifier token")
    put.add_argument("--environment", choices=["sandbox", "production"])
    for name in ("client-id", "client-secret", "refresh-token", "access-token", "income-account-id", "redirect-uri"):
        put.add_argument(f"--{name}", dest=name.replace("-", "_"))
    put.add_argument("--from-json", metavar="FILE", help="read fields from a JSON object in FILE, or - for stdin")
    put.add_argument("--allow-plaintext", action="store_true", help="store secrets unencrypted when no key is set")
    put.set_defaults(command=cmd_connections_put)
    show = conn_sub.add_parser("show", help="print a connection (secrets masked)")
    show.add_argument("realm_id")
    show.add_argument("--reveal", action="store_true", help="print secrets in clear")
    show.set_defaults(command=cmd_connections_show)
    conn_sub.add_parser("list", help="list registered realm ids").set_defaults(command=cmd_connections_list)
    delete = conn_sub.add_parser("delete", help="remove a connection")
    delete.add_argument("realm_id")
    delete.set_defaults(command=cmd_connections_delete)

    sig = sub.add_parser("sign", help="print the intuit-signature of a body's exact bytes")
    sig.add_argument("--token", required=True)
    sig.add_argument("file", nargs="?", default="-", help="body file (default: stdin)")
    sig.set_defaults(command=cmd_sign)

    test = sub.add_parser("send-test", help="POST a signed delivery the way Intuit does and print the status")
    test.add_argument("--url", default=None, help="endpoint (default: this service's QBO_HOST/QBO_PORT/path)")
    test.add_argument("--token", required=True, help="verifier token to sign with")
    test.add_argument("--realm-id", help="realm of the generated event")
    test.add_argument("--format", choices=["legacy", "cloudevents"], default="cloudevents")
    test.add_argument("--entity", default="Customer")
    test.add_argument("--entity-id", default="1")
    test.add_argument("--operation", default="Create", help="Create, Update, Delete, Merge, Void, Emailed")
    test.add_argument("--body", metavar="FILE", help="send this file's exact bytes instead of a generated event")
    test.set_defaults(command=cmd_send_test)

    events = sub.add_parser("events", help="read the events stream")
    ev_sub = events.add_subparsers(required=True, metavar="ACTION")
    tail = ev_sub.add_parser("tail", help="print entries as JSON lines")
    tail.add_argument("--from-start", action="store_true", help="from the oldest entry instead of the newest")
    tail.add_argument("--count", type=positive_int, default=10, help="how many of the newest entries (default 10)")
    tail.add_argument("--follow", action="store_true", help="then wait for new entries")
    tail.add_argument("--dead", action="store_true", help="read the dead-letter stream instead")
    tail.set_defaults(command=cmd_events_tail)

    from service import cli_ops  # here, not at the top: cli_ops imports this module's helpers

    cli_ops.register(sub)
    cli_sim.register(sub)
    cli_keys.register(sub)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# -- serve --------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    embedded: EmbeddedRedis | None = None
    supervisor: threading.Thread | None = None
    stopping = threading.Event()
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = embedded.start()
        # Other processes may share this Redis (CLI commands, consumers): if one stops it, start it again.
        supervisor = threading.Thread(target=_supervise, args=(embedded, stopping), daemon=True)
        supervisor.start()
        # Workers read the same settings from the environment, so they all share this Redis.
        os.environ["QBO_REDIS_URL"] = url
        logger.info(
            "embedded Redis %s at %s (data in %s, appendfsync always); set QBO_REDIS_URL to use your own Redis",
            "started" if embedded.started else "reused",
            url,
            embedded.dir,
        )
    metrics_dir: Path | None = None
    if args.workers > 1:
        # Each worker keeps its own counters; /metrics sums the files the workers write here.
        metrics_dir = Path(settings.data_dir).resolve() / f"metrics-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ["QBO_METRICS_DIR"] = str(metrics_dir)
    # uvicorn restores the handlers it found and re-raises the signal it stopped on; with the default
    # SIGTERM action the process would die right there and leave the embedded Redis running.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if settings.require_durable:  # refuse here with one line, rather than in every worker with a traceback
            asyncio.run(_require_durable(url, settings))
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=max(1, args.workers),
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        stopping.set()
        if supervisor is not None:
            supervisor.join(5)
        signal.signal(signal.SIGTERM, previous)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if embedded is not None:
            embedded.release()
    return 0


async def _require_durable(url: str, settings: Settings) -> None:
    client = make_redis(url, timeout=max(settings.response_budget_seconds, 5.0))
    try:
        await check_durability(client, require=True)
    finally:
        await client.aclose()


def _supervise(embedded: EmbeddedRedis, stopping: threading.Event) -> None:
    while not stopping.wait(1.0):
        try:
            embedded.supervise()
        except (OSError, RuntimeError) as exc:
            logger.error("cannot restart the embedded Redis: %s", exc)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


# -- connections --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Redis]:
    """The configured Redis, or the embedded one (reused if the service runs, else started for this command)."""
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = await asyncio.to_thread(embedded.start)
    client = make_redis(url, timeout=max(settings.response_budget_seconds, 5.0))
    try:
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.release)


def _store(redis: Redis, settings: Settings) -> ConnectionStore:
    return ConnectionStore(
        redis,
        Keys(settings.key_prefix),
        SecretBox(settings.fernet_keys),
        retired_token_days=settings.retired_token_days,
    )


async def cmd_connections_put(args: argparse.Namespace, settings: Settings) -> int:
    fields: dict[str, object] = {}
    if args.from_json:
        try:
            text = sys.stdin.read() if args.from_json == "-" else Path(args.from_json).read_text("utf-8")  # noqa: ASYNC240
            data = json.loads(text)
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, or not JSON (messages quote no content)
            print(f"qbo-webhooks: cannot read --from-json {args.from_json}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(data, dict):
            print("qbo-webhooks: --from-json needs a JSON object", file=sys.stderr)
            return 2
        fields.update(data)
    for name in ConnectionMetadata.field_names():
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if str(fields.get("realm_id", args.realm_id)) != args.realm_id:
        print("qbo-webhooks: realm_id in the JSON differs from the argument", file=sys.stderr)
        return 2
    fields["realm_id"] = args.realm_id
    if not args.realm_id.isdigit():
        print("qbo-webhooks: a realm id is a string of digits", file=sys.stderr)
        return 2
    async with _redis(settings) as redis:
        stored = await _store(redis, settings).put(
            ConnectionMetadata.from_mapping(fields), allow_plaintext=args.allow_plaintext
        )
    if not SecretBox(settings.fernet_keys).enabled:
        print("note: QBO_ENCRYPTION_KEYS is not set; secrets are stored in plain text", file=sys.stderr)
    _print_json(stored.masked())
    return 0


async def cmd_connections_show(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        metadata = await _store(redis, settings).get(args.realm_id)
    if metadata is None:
        print(f"qbo-webhooks: no connection for realm {args.realm_id}", file=sys.stderr)
        return 1
    _print_json(metadata.as_dict() if args.reveal else metadata.masked())
    return 0


async def cmd_connections_list(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        for realm_id in await _store(redis, settings).realm_ids():
            print(realm_id)
    return 0


async def cmd_connections_delete(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        existed = await _store(redis, settings).delete(args.realm_id)
    if not existed:
        print(f"qbo-webhooks: no connection for realm {args.realm_id}", file=sys.stderr)
        return 1
    print(f"deleted connection of realm {args.realm_id}")
    return 0


# -- signing and test deliveries ----------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace, settings: Settings) -> int:
    body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    print(sign(args.token, body))
    return 0


def test_body(fmt: str, realm_id: str, entity: str, entity_id: str, operation: str) -> bytes:
    """A delivery of one event, shaped as Intuit sends it."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    if fmt == "legacy":
        entry = {"name": entity, "id": entity_id, "operation": operation, "lastUpdated": now}
        document: Any = {"eventNotifications": [{"realmId": realm_id, "dataChangeEvent": {"entities": [entry]}}]}
    else:
        verb = VERB_BY_OPERATION.get(operation, operation.lower())
        document = [
            {
                "specversion": "1.0",
                "id": str(uuid.uuid4()),
                "source": "qbo-webhooks.send-test",
                "type": f"qbo.{entity.lower()}.{verb}.v1",
                "datacontenttype": "application/json",
                "time": now,
                "intuitentityid": entity_id,
                "intuitaccountid": realm_id,
                "data": {},
            }
        ]
    return json.dumps(document, separators=(",", ":")).encode()


def cmd_send_test(args: argparse.Namespace, settings: Settings) -> int:
    if args.body:
        body = Path(args.body).read_bytes()
    elif args.realm_id:
        body = test_body(args.format, args.realm_id, args.entity, args.entity_id, args.operation)
    else:
        print("qbo-webhooks: send-test needs --realm-id (or --body FILE)", file=sys.stderr)
        return 2
    url = args.url or f"http://{settings.host}:{settings.port}{settings.webhook_path}"
    if not url.startswith(("http://", "https://")):
        print("qbo-webhooks: --url must be an http:// or https:// URL", file=sys.stderr)
        return 2
    content_type = "application/json" if body.lstrip()[:1] == b"{" else "application/cloudevents-batch+json"
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url,
        data=body,
        method="POST",
        headers={
            "content-type": f"{content_type}; charset=utf-8",
            "intuit-signature": sign(args.token, body),
            "intuit-created-time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "intuit-t-id": str(uuid.uuid4()),
            "user-agent": "qbo-webhooks send-test",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (scheme checked above)
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"qbo-webhooks: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{status} {text}")
    return 0 if status == 200 else 1


# -- events -------------------------------------------------------------------------------------------


async def cmd_events_tail(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys(settings.key_prefix)
    stream = keys.dead_letters if args.dead else keys.events
    async with _redis(settings) as redis:
        entries: list[tuple[str, dict[str, str]]]
        if args.from_start:
            entries = await redis.xrange(stream, count=args.count)  # type: ignore[assignment]
        else:
            entries = list(reversed(await redis.xrevrange(stream, count=args.count)))  # type: ignore[arg-type]
        last = entries[-1][0] if entries else "$"
        for entry_id, fields in entries:
            _print_json({"id": entry_id, **fields}, indent=None)
        while args.follow:
            replies: list[tuple[str, list[tuple[str, dict[str, str]]]]]
            # Block well under the client's socket timeout: an idle stream is not a broken connection.
            replies = await redis.xread({stream: last}, block=1000, count=100)  # type: ignore[assignment]
            for _, batch in replies:
                for entry_id, fields in batch:
                    _print_json({"id": entry_id, **fields}, indent=None)
                    last = entry_id
    return 0


def _print_json(value: object, indent: int | None = 2) -> None:
    print(json.dumps(value, indent=indent, ensure_ascii=False), flush=True)
