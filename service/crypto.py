"""Encryption at rest of connection secrets (SPEC §5.1): ``enc:v1:`` + a Fernet token, keys rotated in place."""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from service.errors import DecryptionError

PREFIX = "enc:v1:"


class SecretBox:
    """Encrypts with the first key, decrypts with any (so keys rotate without downtime)."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys]) if keys else None
        self._primary = Fernet(keys[0]) if keys else None

    def __repr__(self) -> str:
        return f"SecretBox(enabled={self.enabled})"

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    @staticmethod
    def is_encrypted(value: str) -> bool:
        return value.startswith(PREFIX)

    def encrypt(self, value: str) -> str:
        """The stored form: encrypted when keys are configured, else the value unchanged."""
        if self._primary is None or self.is_encrypted(value):
            return value
        return PREFIX + self._primary.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, value: str) -> str:
        """The plain value of a stored one; ``DecryptionError`` when no configured key opens it."""
        if not self.is_encrypted(value):
            return value
        if self._fernet is None:
            raise DecryptionError("value is encrypted and QBO_ENCRYPTION_KEYS is not set")
        try:
            return self._fernet.decrypt(value[len(PREFIX) :].encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError):
            raise DecryptionError("no configured key decrypts the value") from None

    def rotate(self, value: str) -> str:
        """Re-encrypt a stored value under the first key (plain values get encrypted)."""
        if self._fernet is None or self._primary is None:
            raise DecryptionError("QBO_ENCRYPTION_KEYS is not set")
        plain = self.decrypt(value)
        return PREFIX + self._primary.encrypt(plain.encode("utf-8")).decode("ascii")

    def is_current(self, value: str) -> bool:
        """Whether a stored value is already encrypted under the first key."""
        if self._primary is None or not self.is_encrypted(value):
            return False
        try:
            self._primary.decrypt(value[len(PREFIX) :].encode("ascii"))
        except (InvalidToken, ValueError):
            return False
        return True
