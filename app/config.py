"""Settings from the environment (and a `.env` file, as systemd's EnvironmentFile would give).

Real environment variables win over `.env`. Every value is checked once, at start-up: a missing or
invalid one raises `ConfigError` naming the variable, which the CLI turns into a one-line message
and a non-zero exit.

Each setting is declared once, as a `Settings` field made by `setting()`: its variable is the field
name upper-cased, and the declaration holds its default, how its value is read and checked, and a
one-line description. `Settings.from_env` reads them all in field order.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg.conninfo

LOG_LEVELS = ("debug", "info", "warning", "error")
# The customer tiers, each with its monthly limit setting (<tier>_tier_limit in Settings); the
# users.tier CHECK in migrations/0001_initial.sql lists the same (tests/system/test_config.py
# checks both).
TIERS = ("free", "pro", "scale")
# "user": each customer has cache entries of its own, so a hit ("cached": true, or a fast answer)
# never tells one customer what another embedded; "shared": one entry per text for everyone.
CACHE_SCOPES = ("user", "shared")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def without_credentials(text: str, url: str) -> str:
    """`text`, a message about `url`, with the URL's user info and any password in its query
    replaced by `***`: drivers quote the URL, or a part of it, in their errors."""
    rest = url.partition("://")[2]
    secrets = set(re.findall(r"password=([^&#]+)", rest))
    if "@" in rest:
        userinfo = rest.rpartition("@")[0]
        secrets |= {userinfo, userinfo.partition(":")[2]}
    secrets |= {unquote(secret) for secret in secrets}
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def first_line(exc: BaseException) -> str:
    """An exception's first line (driver messages run to several), or its type if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


# --- Parsers: (variable name, its value stripped and never empty) -> the setting's value, or
# ConfigError naming the variable. An empty or unset variable never reaches one: it means the
# default.

Parse = Callable[[str, str], Any]


def text(_name: str, raw: str) -> str:
    return raw


def integer(low: int, high: int) -> Parse:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def number(low: float, high: float) -> Parse:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def per_minute(name: str, raw: str) -> int:
    """A per-minute limit: -1 (unlimited) or at least 1."""
    value = integer(-1, 10**9)(name, raw)
    if value == 0:
        raise ConfigError(f"{name} must be -1 (unlimited) or at least 1, got 0")
    return value


def one_of(choices: tuple[str, ...]) -> Parse:
    def parse(name: str, raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def key_prefix(name: str, raw: str) -> str:
    if len(raw) > 16 or not raw.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{name} must be up to 16 letters, digits, '_' or '-'")
    return raw


def directory(_name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def comma_list(_name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def origins(name: str, raw: str) -> tuple[str, ...]:
    """`*`, or a comma-separated list of origins (scheme://host[:port])."""
    if raw == "*":
        return ("*",)
    found: list[str] = []
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
        found.append(item.lower())
    return tuple(found)


def postgres_uri(name: str, raw: str) -> str:
    # libpq decides what a valid URI is (including ?host=/socket/dir), not a URL parser
    # of our own or yoyo's.
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{name} must start with postgresql:// or postgres://")
    try:
        psycopg.conninfo.conninfo_to_dict(raw)
    except psycopg.ProgrammingError as exc:
        reason = without_credentials(first_line(exc), raw)
        raise ConfigError(f"{name} is not a valid PostgreSQL URI: {reason}") from None
    return raw


def redis_uri(name: str, raw: str) -> str:
    parts = urlsplit(raw)
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
    return raw


# --- Declarations


@dataclass(frozen=True, slots=True)
class Declaration:
    """What a `Settings` field's metadata holds: how its variable is read, and what it is for."""

    parse: Parse
    doc: str
    # Only for a setting without a default: what the "is not set" message asks for.
    expects: str = ""


def setting(
    default: Any = MISSING,
    *,
    parse: Parse,
    doc: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    expects: str = "",
) -> Any:
    """A `Settings` field: no default (and `expects`) makes it required."""
    metadata = {"setting": Declaration(parse, doc, expects)}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def variable(declared: Field[Any]) -> str:
    """A setting's environment variable: its field name upper-cased."""
    return declared.name.upper()


def declaration(declared: Field[Any]) -> Declaration:
    return declared.metadata["setting"]


def settings_variables() -> dict[str, str]:
    """Every setting's variable and its one-line description, in declaration order."""
    return {variable(f): declaration(f).doc for f in fields(Settings)}


@dataclass(frozen=True, slots=True)
class Settings:
    # Read in this order, so the first bad variable is the one reported.
    database_url: str = setting(
        parse=postgres_uri,
        expects="a libpq URI such as postgresql://...",
        doc="PostgreSQL: any libpq URI",
    )
    redis_url: str = setting(
        parse=redis_uri,
        expects="redis://, rediss:// or unix:///path",
        doc="Redis for the quota counters (and the L2 cache unless CACHE_REDIS_URL)",
    )
    # The L2 cache's Redis ("" = REDIS_URL's): apart, it can evict (allkeys-lru) while the
    # quota counters' Redis never does (noeviction).
    cache_redis_url: str = setting("", parse=redis_uri, doc="the L2 cache's Redis, if apart")
    api_host: str = setting("0.0.0.0", parse=text, doc="address to bind")
    api_port: int = setting(8000, parse=integer(1, 65535), doc="port to bind")
    log_level: str = setting("info", parse=one_of(LOG_LEVELS), doc="lowest level logged")
    # The checkout's or the frozen binary's model, for Settings(...) as for from_env. (setting()
    # is dataclasses.field(): ruff takes it for a shared default computed once.)
    model_path: Path = setting(  # noqa: RUF009
        default_factory=default_model_path, parse=directory, doc="the model's directory"
    )
    max_tokens: int = setting(128, parse=integer(1, 512), doc="longest accepted input, in tokens")
    api_key_prefix: str = setting("sk_", parse=key_prefix, doc="prefix of new API keys")
    # One process with every core for ONNX Runtime: uncached throughput is the same as with a
    # worker per core, a lone request is faster, the cache and batching queue are shared
    # (measured: README, Performance). More workers pay only for cache-hit-heavy traffic.
    workers: int = setting(1, parse=integer(1, 64), doc="hypercorn worker processes")
    max_request_bytes: int = setting(
        1024 * 1024,
        parse=integer(1024, 64 * 1024 * 1024),
        doc="largest accepted request body, in bytes",
    )
    read_timeout: float = setting(
        30.0, parse=number(1.0, 3600.0), doc="seconds a client has to send a request body"
    )
    auth_cache_ttl: float = setting(
        10.0, parse=number(0.0, 3600.0), doc="seconds a key lookup is cached in-process"
    )
    db_pool_size: int = setting(10, parse=integer(1, 100), doc="PostgreSQL connections per worker")
    shutdown_timeout: float = setting(
        30.0, parse=number(0.0, 600.0), doc="seconds SIGTERM waits for in-flight requests"
    )
    # One per tier in TIERS (tests/system/test_config.py checks); -1 is unlimited.
    free_tier_limit: int = setting(
        20_000, parse=integer(-1, 10**12), doc="embeddings per month for free users"
    )
    pro_tier_limit: int = setting(
        100_000, parse=integer(-1, 10**12), doc="embeddings per month for pro users"
    )
    scale_tier_limit: int = setting(
        2_000_000, parse=integer(-1, 10**12), doc="embeddings per month for scale users"
    )
    # Per-minute limits, one pair per tier in TIERS (requests and tokens; -1 is unlimited): what
    # one customer may ask of a host shared with others, beside its monthly quota.
    free_tier_rpm: int = setting(60, parse=per_minute, doc="requests per minute for free users")
    pro_tier_rpm: int = setting(600, parse=per_minute, doc="requests per minute for pro users")
    scale_tier_rpm: int = setting(
        3_000, parse=per_minute, doc="requests per minute for scale users"
    )
    free_tier_tpm: int = setting(20_000, parse=per_minute, doc="tokens per minute for free users")
    pro_tier_tpm: int = setting(200_000, parse=per_minute, doc="tokens per minute for pro users")
    scale_tier_tpm: int = setting(
        1_000_000, parse=per_minute, doc="tokens per minute for scale users"
    )
    l1_cache_size: int = setting(
        10_000, parse=integer(0, 10**7), doc="entries of the in-process cache (0: off)"
    )
    l2_cache_ttl: int = setting(
        86_400, parse=integer(0, 365 * 86_400), doc="seconds a vector stays in Redis (0: off)"
    )
    cache_scope: str = setting(
        "user", parse=one_of(CACHE_SCOPES), doc="cache entries per customer, or shared"
    )
    redis_key_prefix: str = setting("smally:", parse=text, doc="prefix of every Redis key")
    usage_buffer_max: int = setting(
        1_000_000,
        parse=integer(1000, 10**8),
        doc="usage records held while PostgreSQL is unreachable",
    )
    ort_threads: int = setting(
        0, parse=integer(0, 256), doc="ONNX Runtime threads per worker (0: cores / WORKERS)"
    )
    batch_window_ms: float = setting(
        1.0, parse=number(0.0, 100.0), doc="milliseconds a run may wait for late-comers"
    )
    max_batch_tokens: int = setting(
        1_024, parse=integer(128, 10**6), doc="padded tokens in one forward pass"
    )
    max_queue_tokens: int = setting(
        1_048_576, parse=integer(128, 10**8), doc="tokens waiting before new work gets 503"
    )
    max_user_queue_tokens: int = setting(
        262_144,
        parse=integer(128, 10**8),
        doc="tokens one customer may have waiting before more gets 429",
    )
    max_tokenize_chars: int = setting(
        2_000_000,
        parse=integer(1024, 10**9),
        doc="characters waiting for the tokenizer before new work gets 503",
    )
    model_aliases: tuple[str, ...] = setting(
        (), parse=comma_list, doc="extra model names /v1/embeddings accepts"
    )
    # Browser origins allowed to call the API cross-origin: () = none (no CORS headers at all),
    # ("*",) = any, else exact origins such as "https://app.example.com".
    cors_origins: tuple[str, ...] = setting(
        (), parse=origins, doc="browser origins allowed to call the API"
    )

    @property
    def onnx_threads(self) -> int:
        """ORT_THREADS, or by default the cores shared out among the worker processes."""
        return self.ort_threads or max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def tier_limits(self) -> dict[str, int]:
        """Monthly embeddings per tier; -1 is unlimited."""
        return {tier: getattr(self, f"{tier}_tier_limit") for tier in TIERS}

    @property
    def tier_rates(self) -> dict[str, tuple[int, int]]:
        """(requests, tokens) per minute per tier; -1 is unlimited."""
        return {
            tier: (getattr(self, f"{tier}_tier_rpm"), getattr(self, f"{tier}_tier_tpm"))
            for tier in TIERS
        }

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        dotenv: Path | None = Path(".env"),
        *,
        require_redis: bool = True,
    ) -> Settings:
        """Build settings from `environ` (default: os.environ) over the values in `dotenv`.

        `require_redis=False` (the admin commands, which touch only PostgreSQL) lets REDIS_URL
        be unset, as ""."""
        env: dict[str, str] = read_dotenv(dotenv) if dotenv is not None else {}
        env.update(os.environ if environ is None else environ)
        optional = set() if require_redis else {"redis_url"}
        values: dict[str, Any] = {}
        for declared in fields(cls):
            name = variable(declared)
            raw = env.get(name, "").strip()
            if raw:
                values[declared.name] = declaration(declared).parse(name, raw)
            elif declared.default is not MISSING or declared.default_factory is not MISSING:
                continue  # the field's own default
            elif declared.name in optional:
                values[declared.name] = ""
            else:
                raise ConfigError(f"{name} is not set ({declaration(declared).expects})")
        return cls(**values)
