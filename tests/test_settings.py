from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from service.errors import ConfigurationError
from service.settings import Settings, load_settings


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QBO_REDIS_URL", "QBO_PORT", "QBO_HOST", "QBO_WEBHOOK_PATH"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.redis_url is None
    assert (settings.host, settings.port, settings.webhook_path) == ("127.0.0.1", 8000, "/webhooks/quickbooks")
    assert settings.max_body_bytes == 5 * 1024 * 1024
    assert settings.dedupe_ttl_seconds == 7 * 86400
    assert settings.response_budget_seconds == 2
    assert settings.body_timeout_seconds == 10
    assert settings.connection_cache_seconds == 10
    assert settings.retired_token_days == 30
    assert settings.dead_letter_maxlen == 1_000_000
    assert settings.require_durable is False


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("QBO_PORT", "9001")
    monkeypatch.setenv("QBO_APP_VERIFIER_TOKENS", " a, b ,,c ")
    monkeypatch.setenv("QBO_ENCRYPTION_KEYS", key)
    monkeypatch.setenv("QBO_WEBHOOK_PATH", "/hooks/qbo/")
    monkeypatch.setenv("QBO_LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.port == 9001
    assert settings.app_tokens == ("a", "b", "c")
    assert settings.fernet_keys == (key,)
    assert settings.webhook_path == "/hooks/qbo"
    assert settings.log_level == "DEBUG"


def test_every_bad_field_gets_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QBO_PORT", "not-a-port")
    monkeypatch.setenv("QBO_MAX_BODY_BYTES", "-1")
    monkeypatch.setenv("QBO_LOG_FORMAT", "xml")
    monkeypatch.setenv("QBO_ENCRYPTION_KEYS", "secret-not-a-fernet-key")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    for field in ("QBO_PORT", "QBO_MAX_BODY_BYTES", "QBO_LOG_FORMAT", "QBO_ENCRYPTION_KEYS"):
        assert sum(line.strip().startswith(field + ":") for line in message.splitlines()) == 1, message
    assert "secret-not-a-fernet-key" not in message


def test_an_empty_redis_url_means_the_embedded_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QBO_REDIS_URL", " ")
    assert load_settings().redis_url is None
    for url in ("redis://localhost:6379/0", "rediss://user:pw@redis.example:6380", "unix:///run/redis.sock?db=1"):
        monkeypatch.setenv("QBO_REDIS_URL", url)
        assert load_settings().redis_url == url


def test_settings_are_immutable() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1
