"""Settings from the environment (and a `.env` file, as systemd's EnvironmentFile would give).

Real environment variables win over `.env`. Every value is checked once, at start-up: a missing or
invalid one raises `ConfigError` naming the variable, which the CLI turns into a one-line message
and a non-zero exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg.conninfo

LOG_LEVELS = ("debug", "info", "warning", "error")
# The customer tiers, each with its monthly limit setting (<TIER>_TIER_LIMIT below); the
# users.tier CHECK in migrations/0001_initial.sql lists the same (tests/test_config.py compares).
TIERS = ("free", "pro", "scale")
# "user": each customer has cache entries of its own, so a hit ("cached": true, or a fast answer)
# never tells one customer what another embedded; "shared": one entry per text for everyone.
CACHE_SCOPES = ("user", "shared")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def default_model_path() -> Path:
    # A frozen binary looks next to itself (the model ships beside it, not inside it);
    # a source checkout looks in the repository, where `make model` builds it.
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent / "models" / "all-MiniLM-L6-v2"
    return Path(__file__).resolve().parent.parent / "models" / "all-MiniLM-L6-v2"


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines the way systemd's EnvironmentFile does (comments, quotes, export)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        line = line.removeprefix("export ").lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "").isalnum():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name] = value
    return values


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    redis_url: str
    # The L2 cache's Redis ("" = REDIS_URL's): apart, it can evict (allkeys-lru) while the
    # quota counters' Redis never does (noeviction).
    cache_redis_url: str = ""
    api_host: str = "0.0.0.0"
    api_port: int = 8000
    log_level: str = "info"
    model_path: Path = Path("models/all-MiniLM-L6-v2")
    max_tokens: int = 128
    api_key_prefix: str = "sk_"
    # One process with every core for ONNX Runtime: uncached throughput is the same as with a
    # worker per core, a lone request is faster, the cache and batching queue are shared
    # (measured: README, Performance). More workers pay only for cache-hit-heavy traffic.
    workers: int = 1
    max_request_bytes: int = 1024 * 1024
    read_timeout: float = 30.0
    auth_cache_ttl: float = 10.0
    db_pool_size: int = 10
    shutdown_timeout: float = 30.0
    free_tier_limit: int = 20_000
    pro_tier_limit: int = 100_000
    scale_tier_limit: int = 2_000_000
    l1_cache_size: int = 10_000
    l2_cache_ttl: int = 86_400
    cache_scope: str = "user"
    redis_key_prefix: str = "smally:"
    usage_buffer_max: int = 1_000_000
    ort_threads: int = 0
    batch_window_ms: float = 1.0
    max_batch_tokens: int = 16_384
    max_queue_tokens: int = 262_144
    model_aliases: tuple[str, ...] = ()
    # Browser origins allowed to call the API cross-origin: () = none (no CORS headers at all),
    # ("*",) = any, else exact origins such as "https://app.example.com".
    cors_origins: tuple[str, ...] = ()

    @property
    def onnx_threads(self) -> int:
        """ORT_THREADS, or by default the cores shared out among the worker processes."""
        return self.ort_threads or max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def tier_limits(self) -> dict[str, int]:
        """Monthly embeddings per tier; -1 is unlimited."""
        return {
            "free": self.free_tier_limit,
            "pro": self.pro_tier_limit,
            "scale": self.scale_tier_limit,
        }

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        dotenv: Path | None = Path(".env"),
        *,
        require_redis: bool = True,
    ) -> Settings:
        """Build settings from `environ` (default: os.environ) over the values in `dotenv`."""
        env: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
        env.update(os.environ if environ is None else environ)
        reader = _Reader(env)
        return cls(
            database_url=reader.database_url("DATABASE_URL", required=True),
            redis_url=reader.redis_url("REDIS_URL", required=require_redis),
            cache_redis_url=reader.redis_url("CACHE_REDIS_URL", required=False),
            api_host=reader.text("API_HOST", "0.0.0.0"),
            api_port=reader.integer("API_PORT", 8000, low=1, high=65535),
            log_level=reader.choice("LOG_LEVEL", "info", LOG_LEVELS),
            model_path=Path(reader.text("MODEL_PATH", str(default_model_path()))).expanduser(),
            max_tokens=reader.integer("MAX_TOKENS", 128, low=1, high=512),
            api_key_prefix=reader.key_prefix("API_KEY_PREFIX", "sk_"),
            workers=reader.integer("WORKERS", 1, low=1, high=64),
            max_request_bytes=reader.integer(
                "MAX_REQUEST_BYTES", 1024 * 1024, low=1024, high=64 * 1024 * 1024
            ),
            read_timeout=reader.number("READ_TIMEOUT", 30.0, low=1.0, high=3600.0),
            auth_cache_ttl=reader.number("AUTH_CACHE_TTL", 10.0, low=0.0, high=3600.0),
            db_pool_size=reader.integer("DB_POOL_SIZE", 10, low=1, high=100),
            shutdown_timeout=reader.number("SHUTDOWN_TIMEOUT", 30.0, low=0.0, high=600.0),
            free_tier_limit=reader.integer("FREE_TIER_LIMIT", 20_000, low=-1, high=10**12),
            pro_tier_limit=reader.integer("PRO_TIER_LIMIT", 100_000, low=-1, high=10**12),
            scale_tier_limit=reader.integer("SCALE_TIER_LIMIT", 2_000_000, low=-1, high=10**12),
            l1_cache_size=reader.integer("L1_CACHE_SIZE", 10_000, low=0, high=10**7),
            l2_cache_ttl=reader.integer("L2_CACHE_TTL", 86_400, low=0, high=365 * 86_400),
            cache_scope=reader.choice("CACHE_SCOPE", "user", CACHE_SCOPES),
            redis_key_prefix=reader.text("REDIS_KEY_PREFIX", "smally:"),
            usage_buffer_max=reader.integer("USAGE_BUFFER_MAX", 1_000_000, low=1000, high=10**8),
            ort_threads=reader.integer("ORT_THREADS", 0, low=0, high=256),
            batch_window_ms=reader.number("BATCH_WINDOW_MS", 1.0, low=0.0, high=100.0),
            max_batch_tokens=reader.integer("MAX_BATCH_TOKENS", 16_384, low=128, high=10**6),
            max_queue_tokens=reader.integer("MAX_QUEUE_TOKENS", 262_144, low=128, high=10**8),
            model_aliases=tuple(
                alias.strip()
                for alias in reader.text("MODEL_ALIASES", "").split(",")
                if alias.strip()
            ),
            cors_origins=reader.origins("CORS_ORIGINS"),
        )


class _Reader:
    """Reads one variable at a time and raises ConfigError naming it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip()
        return value or default

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def key_prefix(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if len(value) > 16 or not value.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{name} must be up to 16 letters, digits, '_' or '-'")
        return value

    def origins(self, name: str) -> tuple[str, ...]:
        """Empty, `*`, or a comma-separated list of origins (scheme://host[:port])."""
        raw = self.env.get(name, "").strip()
        if raw == "*":
            return ("*",)
        origins: list[str] = []
        for item in (part.strip().rstrip("/") for part in raw.split(",")):
            if not item:
                continue
            if item == "*":
                raise ConfigError(f"{name}: '*' must stand alone, not in a list")
            parts = urlsplit(item)
            try:
                _ = parts.port
            except ValueError:
                raise ConfigError(f"{name}: {item!r} has an invalid port") from None
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.username is not None
                or parts.path
                or parts.query
                or parts.fragment
            ):
                raise ConfigError(
                    f"{name}: {item!r} is not an origin like https://app.example.com "
                    "(scheme, host and port only)"
                )
            # Browsers send the origin lower-cased; compare it as they send it.
            origins.append(item.lower())
        return tuple(origins)

    def database_url(self, name: str, *, required: bool) -> str:
        value = self.env.get(name, "").strip()
        if not value:
            if required:
                raise ConfigError(f"{name} is not set (a libpq URI such as postgresql://...)")
            return ""
        # libpq decides what a valid URI is (including ?host=/socket/dir), not a URL parser
        # of our own or yoyo's.
        if not value.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{name} must start with postgresql:// or postgres://")
        try:
            psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"{name} is not a valid PostgreSQL URI: {_first_line(exc)}") from None
        return value

    def redis_url(self, name: str, *, required: bool) -> str:
        value = self.env.get(name, "").strip()
        if not value:
            if required:
                raise ConfigError(f"{name} is not set (redis://, rediss:// or unix:///path)")
            return ""
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(
                f"{name} must use redis://, rediss:// or unix://, got {parts.scheme or 'none'}://"
            )
        if parts.scheme == "unix" and not parts.path:
            raise ConfigError(f"{name} must name a socket path: unix:///path/to/redis.sock")
        if parts.scheme != "unix" and not parts.hostname:
            raise ConfigError(f"{name} must name a host: redis://host:6379/0")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(f"{name} has an invalid port") from None
        return value


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
