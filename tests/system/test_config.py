"""Settings parsing, without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, Settings, read_dotenv

REQUIRED = {
    "DATABASE_URL": "postgresql://u:p@db.example:5432/smally",
    "REDIS_URL": "redis://r:6379/0",
}


def test_defaults() -> None:
    settings = Settings.from_env(REQUIRED, dotenv=None)
    assert (settings.api_host, settings.api_port, settings.log_level) == ("0.0.0.0", 8000, "info")
    assert (settings.max_tokens, settings.api_key_prefix, settings.workers) == (128, "sk_", 1)
    assert settings.max_request_bytes == 1024 * 1024 and settings.auth_cache_ttl == 10.0
    assert settings.model_path.parts[-2:] == ("models", "all-MiniLM-L6-v2")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:@/postgres?host=/tmp/some/dir",
        "postgres://user@localhost/db?sslmode=require",
        "postgresql:///smally",
    ],
)
def test_any_libpq_uri_is_accepted(url: str) -> None:
    assert Settings.from_env({**REQUIRED, "DATABASE_URL": url}, dotenv=None).database_url == url


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@cache.example:6380", "unix:///run/r.sock"]
)
def test_redis_urls(url: str) -> None:
    assert Settings.from_env({**REQUIRED, "REDIS_URL": url}, dotenv=None).redis_url == url


def test_invalid_libpq_uri_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings.from_env(
            {**REQUIRED, "DATABASE_URL": "postgresql://h/db?nosuchoption=1"}, dotenv=None
        )


def test_dotenv_parsing(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# comment\n\nexport A=1\nB='two words'\nC=\"x=y\"\n; also comment\n")
    assert read_dotenv(path) == {"A": "1", "B": "two words", "C": "x=y"}
    path.write_text("not a pair\n")
    with pytest.raises(ConfigError, match=":1:"):
        read_dotenv(path)
