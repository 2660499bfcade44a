"""The one exception hierarchy. Domain code raises these; only the edge maps them to HTTP statuses."""

from __future__ import annotations


class QBOError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigurationError(QBOError):
    """The settings cannot be used; the message has one line per bad field."""


class SignatureError(QBOError):
    """The delivery is not authenticated. ``reason`` is for logs and metrics only, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StorageUnavailable(QBOError):
    """Redis did not answer (down, timed out, or refused the write). Intuit retries, so nothing is lost."""


class DecryptionError(QBOError):
    """A stored secret could not be decrypted with any configured key."""


class EncryptionRequired(QBOError):
    """A secret would be stored in plain text and the caller did not allow it."""


class UnreadableConnection(QBOError):
    """A connection another writer stored in a form we cannot read; we do not overwrite it."""
