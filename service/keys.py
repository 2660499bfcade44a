"""Every Redis key name the project uses (SPEC §5), derived from one prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "qbo"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:events:dead"

    @property
    def verifier_tokens(self) -> str:
        return f"{self.prefix}:verifier-tokens"

    @property
    def connection_changes(self) -> str:
        """Pub/sub channel: a realm id whenever our CLI writes or deletes its connection."""
        return f"{self.prefix}:connection-changes"

    @property
    def connection_pattern(self) -> str:
        return f"{self.prefix}:connection:*"

    def connection(self, realm_id: str) -> str:
        return f"{self.prefix}:connection:{realm_id}"

    def realm_of(self, connection_key: str) -> str:
        return connection_key.removeprefix(f"{self.prefix}:connection:")

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}:seen:{event_id}"
