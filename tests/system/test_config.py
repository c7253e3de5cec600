"""Settings parsing, without starting anything."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from app.config import TIERS, ConfigError, Settings, read_dotenv, settings_variables

ROOT = Path(__file__).resolve().parents[2]

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


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://smally:S3cret%zz@db.example/smally",  # libpq quotes the bad token
        "postgresql://smally:S3cret@[::1/smally",  # libpq quotes the whole URI
        "postgresql://smally:S3cret@db.example/smally?password=S3cret&nosuch=1",
    ],
)
def test_an_invalid_libpq_uri_is_reported_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**REQUIRED, "DATABASE_URL": url}, dotenv=None)
    message = str(caught.value)
    assert message.startswith("DATABASE_URL is not a valid PostgreSQL URI: "), message
    assert "S3cret" not in message, message


def test_dotenv_parsing(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("# comment\n\nexport A=1\nB='two words'\nC=\"x=y\"\n; also comment\n")
    assert read_dotenv(path) == {"A": "1", "B": "two words", "C": "x=y"}
    path.write_text("not a pair\n")
    with pytest.raises(ConfigError, match=":1:"):
        read_dotenv(path)


def test_from_env_defaults_are_the_declared_ones() -> None:
    # One default per setting: unset variables give what Settings(...) gives.
    direct = Settings(database_url=REQUIRED["DATABASE_URL"], redis_url=REQUIRED["REDIS_URL"])
    assert Settings.from_env(REQUIRED, dotenv=None) == direct


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"REDIS_URL": "redis://r"},
            "DATABASE_URL is not set (a libpq URI such as postgresql://...)",
        ),
        (
            {"DATABASE_URL": "postgresql://h/db"},
            "REDIS_URL is not set (redis://, rediss:// or unix:///path)",
        ),
        ({**REQUIRED, "API_PORT": "http"}, "API_PORT must be an integer, got 'http'"),
        ({**REQUIRED, "API_PORT": "0"}, "API_PORT must be between 1 and 65535, got 0"),
        (
            {**REQUIRED, "READ_TIMEOUT": "0.5"},
            "READ_TIMEOUT must be between 1.0 and 3600.0, got 0.5",
        ),
        ({**REQUIRED, "READ_TIMEOUT": "soon"}, "READ_TIMEOUT must be a number, got 'soon'"),
        (
            {**REQUIRED, "LOG_LEVEL": "LOUD"},
            "LOG_LEVEL must be one of debug, info, warning, error, got 'loud'",
        ),
        (
            {**REQUIRED, "API_KEY_PREFIX": "sk!"},
            "API_KEY_PREFIX must be up to 16 letters, digits, '_' or '-'",
        ),
        (
            {**REQUIRED, "CACHE_REDIS_URL": "http://r"},
            "CACHE_REDIS_URL must use redis://, rediss:// or unix://, got http://",
        ),
        (
            {**REQUIRED, "DATABASE_URL": "mysql://h/db"},
            "DATABASE_URL must start with postgresql:// or postgres://",
        ),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env, dotenv=None)
    assert str(caught.value) == message


def test_variables_are_read_in_declaration_order() -> None:
    # Two bad variables: the one declared first is reported.
    env = {**REQUIRED, "API_PORT": "0", "CORS_ORIGINS": "nope"}
    with pytest.raises(ConfigError, match=r"^API_PORT"):
        Settings.from_env(env, dotenv=None)


def test_admin_commands_need_no_redis() -> None:
    env = {"DATABASE_URL": REQUIRED["DATABASE_URL"], "MAX_TOKENS": " 256 ", "LOG_LEVEL": "DEBUG"}
    settings = Settings.from_env(env, dotenv=None, require_redis=False)
    assert (settings.redis_url, settings.max_tokens, settings.log_level) == ("", 256, "debug")


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("API_PORT=9000\nWORKERS=3\nMODEL_ALIASES= a, ,b \n")
    settings = Settings.from_env({**REQUIRED, "API_PORT": "9001"}, dotenv=path)
    assert (settings.api_port, settings.workers) == (9001, 3)
    assert settings.model_aliases == ("a", "b")


def test_every_tier_has_its_limit_setting() -> None:
    limit_settings = {f.name for f in fields(Settings) if f.name.endswith("_tier_limit")}
    assert limit_settings == {f"{tier}_tier_limit" for tier in TIERS}
    settings = Settings.from_env({**REQUIRED, "PRO_TIER_LIMIT": "-1"}, dotenv=None)
    assert settings.tier_limits == {"free": 20_000, "pro": -1, "scale": 2_000_000}
    assert list(settings.tier_limits) == list(TIERS)


def test_the_users_tier_check_lists_the_tiers() -> None:
    sql = (ROOT / "migrations" / "0001_initial.sql").read_text()
    check = re.search(r"\btier\b[^,]*CHECK \(tier IN \(([^)]*)\)\)", sql)
    assert check, "users.tier CHECK not found"
    assert tuple(re.findall(r"'(\w+)'", check.group(1))) == TIERS


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Configuration\n(.*?)^## ", readme, re.S | re.M)
    assert section, "README has no Configuration section"
    documented = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section.group(1), re.M)
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert set(documented) == set(settings_variables())
