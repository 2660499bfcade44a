"""``qbo-webhooks simulate``: a simulated Intuit that sends signed deliveries and retries until 200."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.models import ConnectionMetadata
from service.settings import Settings
from service.simulator import FORMATS, REALM_BASE, RetrySchedule, Simulator, build_deliveries, make_realms


def register(subparsers: Any) -> None:
    """Add the ``simulate`` command to the CLI's subparsers."""
    sim = subparsers.add_parser(
        "simulate",
        help="act as Intuit: send signed deliveries for many realms, retry every non-200, report counts",
    )
    sim.add_argument("--url", required=True, help="the webhook endpoint (http:// or https://)")
    sim.add_argument("--token", required=True, help="verifier token the deliveries are signed with")
    sim.add_argument("--realms", type=int, default=10, help="how many realms (default 10)")
    sim.add_argument("--deliveries", type=int, default=100, help="how many deliveries (default 100)")
    sim.add_argument("--format", choices=FORMATS, default="mixed", help="payload format (default mixed)")
    sim.add_argument("--concurrency", type=int, default=8, help="concurrent senders (default 8)")
    sim.add_argument("--deadline", type=float, default=120.0, help="stop retrying after this many seconds")
    sim.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    sim.add_argument("--realm-base", type=int, default=REALM_BASE, help="first realm id (default %(default)s)")
    sim.add_argument(
        "--register",
        action="store_true",
        help="first register the realms with --token in the configured Redis (QBO_REDIS_URL or the embedded one)",
    )
    sim.set_defaults(command=cmd_simulate)


async def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    if args.realms < 1 or args.deliveries < 0 or args.deadline <= 0:
        print("qbo-webhooks: --realms must be >= 1, --deliveries >= 0, --deadline > 0", file=sys.stderr)
        return 2
    realms = make_realms(args.realms, args.realm_base)
    if args.register:
        await _register(realms, args.token, settings)
    deliveries = build_deliveries(dict.fromkeys(realms, args.token), args.deliveries, args.format, seed=args.seed)
    try:
        simulator = Simulator(
            args.url,
            concurrency=args.concurrency,
            schedule=RetrySchedule(give_up_after=args.deadline),
        )
    except ValueError as exc:
        print(f"qbo-webhooks: {exc}", file=sys.stderr)
        return 2
    report = await simulator.run(deliveries, deadline_seconds=args.deadline)
    print(json.dumps(report.summary(), indent=2))
    return 0 if not report.unacknowledged else 1


async def _register(realms: list[str], token: str, settings: Settings) -> None:
    # Imported here: service.cli imports this module to register the command.
    from service.cli import _redis, _store

    async with _redis(settings) as redis:
        store = _store(redis, settings)
        for realm_id in realms:
            await store.put(ConnectionMetadata(realm_id=realm_id, webhook_verifier_token=token, environment="sandbox"))
