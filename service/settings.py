"""Configuration: one settings class, read from ``QBO_*`` environment variables in one place (SPEC §6)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import ConfigurationError


class Settings(BaseSettings):
    """Everything the service, the CLI and the tests configure.

    Build it once (``Settings()`` reads the environment; tests pass explicit values) and hand it down.
    """

    model_config = SettingsConfigDict(env_prefix="QBO_", extra="ignore", frozen=True)

    # repr=False: a URL may carry a password, and keys and tokens are secrets (SPEC §5.1).
    redis_url: str | None = Field(default=None, repr=False, description="Redis URL; unset: the embedded Redis")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    webhook_path: str = "/webhooks/quickbooks"
    key_prefix: str = Field(default="qbo", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    dedupe_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    app_verifier_tokens: str = Field(default="", repr=False)
    encryption_keys: str = Field(default="", repr=False)
    response_budget_seconds: float = Field(default=2.0, gt=0, le=30)
    body_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    connection_cache_seconds: float = Field(default=10.0, ge=0, le=3600)
    retired_token_days: float = Field(default=30.0, ge=0)
    dead_letter_maxlen: int = Field(default=1_000_000, ge=1000)
    require_durable: bool = False
    min_replicas: int = Field(default=0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"
    data_dir: str = Field(default=".data", description="where the embedded Redis keeps its files")
    metrics_dir: str | None = Field(default=None, description="set by `serve --workers N`: per-worker metrics files")

    @field_validator("redis_url")
    @classmethod
    def _url_is_redis(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # QBO_REDIS_URL= (empty) means unset: the embedded Redis
        from redis.connection import parse_url

        try:
            parse_url(value)  # type: ignore[no-untyped-call]
        except ValueError:
            # Never echo the URL: it may carry a password.
            raise ValueError(
                "must be a Redis URL: redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path/to.sock"
            ) from None
        return value

    @field_validator("webhook_path")
    @classmethod
    def _path_is_absolute(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith("/") or " " in value:
            raise ValueError("must be an absolute URL path such as /webhooks/quickbooks")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("encryption_keys")
    @classmethod
    def _keys_are_fernet(cls, value: str) -> str:
        from cryptography.fernet import Fernet

        for key in _split(value):
            try:
                Fernet(key)
            except (ValueError, TypeError):
                # Never echo the key itself: it is a secret.
                raise ValueError("each key must be a Fernet key (32 url-safe base64-encoded bytes)") from None
        return value

    @property
    def app_tokens(self) -> tuple[str, ...]:
        return _split(self.app_verifier_tokens)

    @property
    def fernet_keys(self) -> tuple[str, ...]:
        return _split(self.encryption_keys)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value raises ``ConfigurationError`` with one line per field."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"QBO_{field.upper()}: {error['msg']}")
        raise ConfigurationError("invalid configuration:\n  " + "\n  ".join(lines)) from None
