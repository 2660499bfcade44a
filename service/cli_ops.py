"""Operator commands of ``qbo-webhooks``: consume, dead-letters list|replay|purge, stats, stream trim|delete-group."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from service.cli import _print_json, _redis, _store, positive_int
from service.consumer import Consumer, Handler
from service.deadletters import DeadLetters
from service.keys import Keys
from service.models import DeadLetterReason
from service.settings import Settings
from service.stats import StreamAdmin

logger = logging.getLogger("service.cli")

REASONS = [reason.value for reason in DeadLetterReason]


def register(sub: Any) -> None:
    """Add this module's subcommands to ``qbo-webhooks``'s subparsers."""
    consume = sub.add_parser("consume", help="run a consumer-group worker that calls a handler for every event")
    consume.add_argument("--group", required=True, help="consumer group name")
    consume.add_argument("--handler", required=True, metavar="MODULE:FUNCTION", help="called with each StreamEvent")
    consume.add_argument("--consumer", help="this worker's consumer name (default: <host>-<pid>)")
    consume.add_argument("--concurrency", type=positive_int, default=1, help="handlers running at once (default 1)")
    consume.add_argument("--max-deliveries", type=positive_int, default=5, help="then dead-letter (default 5)")
    consume.add_argument(
        "--claim-idle", type=_positive_float, default=60.0, help="reclaim entries idle S seconds (default 60)"
    )
    consume.add_argument("--drain-timeout", type=_positive_float, default=30.0, help="on SIGTERM/SIGINT (default 30)")
    consume.add_argument("--from-end", action="store_true", help="a new group starts at the end, not the start")
    consume.set_defaults(command=cmd_consume)

    dead = sub.add_parser("dead-letters", help="list, replay and purge dead letters")
    dead_sub = dead.add_subparsers(required=True, metavar="ACTION")
    listing = dead_sub.add_parser("list", help="print letters as JSON lines, oldest first")
    listing.add_argument("--reason", choices=REASONS)
    listing.add_argument("--count", type=positive_int, help="at most N letters")
    listing.set_defaults(command=cmd_dead_letters_list)
    replay = dead_sub.add_parser("replay", help="move letters back into the events stream (SPEC 5.4 rules)")
    replay.add_argument("--reason", choices=REASONS, help="default: every replayable letter")
    replay.add_argument("--id", dest="letter_id", help="one letter by its id")
    replay.set_defaults(command=cmd_dead_letters_replay)
    purge = dead_sub.add_parser("purge", help="delete letters (all, or of one reason)")
    purge.add_argument("--reason", choices=REASONS)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(command=cmd_dead_letters_purge)

    sub.add_parser("stats", help="stream length, groups, pending, lag, dead letters").set_defaults(command=cmd_stats)
    stream = sub.add_parser("stream", help="maintain the events stream")
    stream_sub = stream.add_subparsers(required=True, metavar="ACTION")
    trim = stream_sub.add_parser("trim", help="remove the entries every consumer group has acknowledged")
    trim.set_defaults(command=cmd_stream_trim)
    drop = stream_sub.add_parser("delete-group", help="remove a consumer group that is no longer used")
    drop.add_argument("group")
    drop.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    drop.set_defaults(command=cmd_stream_delete_group)


# -- consume ------------------------------------------------------------------------------------------


async def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # handlers are found in the working directory, as uvicorn finds apps
    try:
        handler = load_handler(args.handler)
    except (ImportError, AttributeError, ValueError) as exc:
        print(f"qbo-webhooks: cannot load handler {args.handler!r}: {exc}", file=sys.stderr)
        return 2
    async with _redis(settings) as redis:
        consumer = Consumer(
            redis,
            group=args.group,
            consumer=args.consumer,
            prefix=settings.key_prefix,
            start="$" if args.from_end else "0",
            claim_idle=args.claim_idle,
            max_deliveries=args.max_deliveries,
            dead_letter_maxlen=settings.dead_letter_maxlen,
        )
        async with consumer:
            logger.info("consumer %s of group %s started (handler %s)", consumer.name, args.group, args.handler)
            with _stop_on_signals(consumer):
                await consumer.process(handler, concurrency=args.concurrency, drain_timeout=args.drain_timeout)
    logger.info("consumer %s stopped", consumer.name)
    return 0


def load_handler(spec: str) -> Handler:
    """``package.module:function`` → the function."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError("expected MODULE:FUNCTION")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec} is not callable")
    handler: Handler = target
    return handler


@contextlib.contextmanager
def _stop_on_signals(consumer: Consumer) -> Iterator[None]:
    """SIGTERM and SIGINT drain the worker; the previous handlers are restored afterwards."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def on_signal(sig: signal.Signals) -> None:
        logger.info("%s received: reading nothing new, draining in-flight handlers", sig.name)
        consumer.stop()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])


# -- dead letters -------------------------------------------------------------------------------------


async def cmd_dead_letters_list(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        for letter in await DeadLetters(redis, Keys(settings.key_prefix)).list_letters(args.reason, args.count):
            _print_json(letter.as_dict(), indent=None)
    return 0


async def cmd_dead_letters_replay(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        letters = DeadLetters(
            redis,
            Keys(settings.key_prefix),
            _store(redis, settings),
            dedupe_ttl_seconds=settings.dedupe_ttl_seconds,
        )
        outcomes = await letters.replay_matching(args.reason, args.letter_id)
    tally: dict[str, int] = {}
    for outcome in outcomes:
        _print_json(outcome.as_dict(), indent=None)
        tally[outcome.status] = tally.get(outcome.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(tally.items())) or "nothing to replay"
    print(f"replay: {summary}", file=sys.stderr)
    return 1 if tally.get("refused") or tally.get("gone") else 0


async def cmd_dead_letters_purge(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        letters = DeadLetters(redis, Keys(settings.key_prefix))
        ids = [letter.id async for letter in letters.scan(args.reason)]
        what = f"{len(ids)} dead letter(s)" + (f" with reason {args.reason}" if args.reason else "")
        if not ids:
            print(f"no {what.split(' ', 1)[1]} to purge")
            return 0
        if not args.yes and not _confirm(f"Delete {what}? [y/N] "):
            print("nothing deleted")
            return 1
        removed = await letters.purge(ids)
    print(f"deleted {removed} dead letter(s)")
    return 0


def _confirm(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


# -- stats and trim -----------------------------------------------------------------------------------


async def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        _print_json(await StreamAdmin(redis, Keys(settings.key_prefix)).stats())
    return 0


async def cmd_stream_trim(args: argparse.Namespace, settings: Settings) -> int:
    async with _redis(settings) as redis:
        result = await StreamAdmin(redis, Keys(settings.key_prefix)).trim()
    if result.min_id:
        print(f"removed {result.removed} entries acknowledged by every group (kept ids >= {result.min_id})")
    else:
        print("nothing trimmed: the stream has no consumer group (or does not exist)")
    return 0


async def cmd_stream_delete_group(args: argparse.Namespace, settings: Settings) -> int:
    if not args.yes and not _confirm(
        f"Delete consumer group {args.group!r}? Its consumers lose their place and pending entries. [y/N] "
    ):
        print("nothing deleted")
        return 1
    async with _redis(settings) as redis:
        existed = await StreamAdmin(redis, Keys(settings.key_prefix)).delete_group(args.group)
    if not existed:
        print(f"qbo-webhooks: no consumer group {args.group!r}", file=sys.stderr)
        return 1
    print(f"deleted consumer group {args.group!r}; `stream trim` no longer waits for it")
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value
