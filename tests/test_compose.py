"""docker-compose.yml is not run here (no Docker engine); check it parses and matches the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_redis_is_durable_and_health_checked() -> None:
    redis = load()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_receiver_is_built_here_and_waits_for_a_healthy_redis() -> None:
    receiver = load()["services"]["receiver"]
    assert receiver["build"] == "."
    assert receiver["depends_on"]["redis"]["condition"] == "service_healthy"
    env = receiver["environment"]
    assert env["QBO_REDIS_URL"].startswith("redis://redis:6379")
    assert env["QBO_HOST"] == "0.0.0.0"  # noqa: S104 (inside the container)
    assert env["QBO_REQUIRE_DURABLE"] == "true"
    assert "8000:8000" in receiver["ports"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["qbo-webhooks", "serve"]' in dockerfile
