"""``qbo-webhooks keys generate|rotate``: encryption keys of the secrets at rest (SPEC §5.1)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cryptography.fernet import Fernet

from service.crypto import SecretBox
from service.keys import Keys
from service.rotation import Rotator
from service.settings import Settings


def register(subparsers: Any) -> None:
    """Add the ``keys`` command to the CLI's subparsers."""
    keys = subparsers.add_parser("keys", help="generate an encryption key; re-encrypt stored secrets under the first")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    actions.add_parser(
        "generate", help="print a new Fernet key (put it first in QBO_ENCRYPTION_KEYS, keep the old ones after it)"
    ).set_defaults(command=cmd_keys_generate)
    actions.add_parser(
        "rotate",
        help="re-encrypt every connection's secrets and the verifier-token index under the first key "
        "of QBO_ENCRYPTION_KEYS (idempotent; safe to interrupt and run again)",
    ).set_defaults(command=cmd_keys_rotate)


def cmd_keys_generate(args: argparse.Namespace, settings: Settings) -> int:
    print(Fernet.generate_key().decode("ascii"))
    return 0


async def cmd_keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: service.cli imports this module to register the command.
    from service.cli import _redis

    async with _redis(settings) as redis:
        report = await Rotator(redis, Keys(settings.key_prefix), SecretBox(settings.fernet_keys)).run()
    print(json.dumps({**report.as_dict(), "complete": report.complete}, indent=2))
    return 0 if report.complete else 1
