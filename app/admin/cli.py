"""Command line: `api` (serve, migrate) and `create_api_key`.

Every command reads settings first; a bad setting is one line on stderr and exit status 2.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click
import psycopg
from yoyo.exceptions import LockTimeout

from app.admin.keys import AccountError, create_key, list_keys, normalize_email, revoke_key
from app.admin.migrations import (
    MigrationError,
    apply_migrations,
    migration_status,
    rollback_migrations,
)
from app.admin.usage_report import KeyUsage, all_users_usage, monthly_usage, parse_month
from app.buildinfo import version_line
from app.config import ConfigError, Settings, first_line
from app.serving.quota import limit_or_none

EXIT_CONFIG = 2
T = TypeVar("T")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_settings(**kwargs: Any) -> Settings:
    try:
        return Settings.from_env(**kwargs)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


def migrate_or_exit(database_url: str) -> list[str]:
    try:
        return apply_migrations(database_url)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL (DATABASE_URL): {first_line(exc)}")
    except LockTimeout as exc:
        _fail(f"database migrations are locked by another process: {first_line(exc)}")


def in_database(settings: Settings, action: Callable[[psycopg.Connection], T]) -> T:
    """An operator command's database work: bad input or an unreachable database is one line
    on stderr and exit status 1, never a traceback."""
    try:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            return action(conn)
    except AccountError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL (DATABASE_URL): {first_line(exc)}")


def _version_option(program: str) -> Callable[[Any], Any]:
    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(version_line(program))
            ctx.exit()

    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=show,
        help="Show the version and build, then exit.",
    )


@click.group(invoke_without_command=True)
@_version_option("api")
@click.pass_context
def api(ctx: click.Context) -> None:
    """Smally embeddings API. With no command: apply migrations, then serve."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@api.command()
def serve() -> None:
    """Apply pending migrations, then serve HTTP with hypercorn."""
    from app.http.runner import run_hypercorn
    from app.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    sys.exit(run_hypercorn(settings, migrate=migrate_or_exit))


@api.command()
@click.option(
    "--status", is_flag=True, help="Only list applied and pending migrations; change nothing."
)
@click.option(
    "--rollback",
    is_flag=True,
    help="Revert the newest applied migration (its .rollback.sql), or those after --to.",
)
@click.option("--to", "to", metavar="ID", help="With --rollback: revert every migration after ID.")
def migrate(status: bool, rollback: bool, to: str | None) -> None:
    """Apply pending migrations and list them all (--status: list only; --rollback: revert)."""
    if to is not None and not rollback:
        _fail("--to goes with --rollback", EXIT_CONFIG)
    if status and rollback:
        _fail("--status and --rollback exclude each other", EXIT_CONFIG)
    settings = load_settings(require_redis=False)
    applied: list[str] = []
    if rollback:
        for reverted in _rollback_or_exit(settings.database_url, to):
            click.echo(f"{reverted}\trolled back")
    elif not status:
        applied = migrate_or_exit(settings.database_url)
    try:
        statuses = migration_status(settings.database_url)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL (DATABASE_URL): {first_line(exc)}")
    for migration in statuses:
        when = (
            migration.applied_at.isoformat(timespec="seconds")
            if migration.applied_at
            else "pending"
        )
        mark = " (applied now)" if migration.id in applied else ""
        click.echo(f"{migration.id}\t{when}{mark}")


def _rollback_or_exit(database_url: str, to: str | None) -> list[str]:
    try:
        return rollback_migrations(database_url, to=to)
    except MigrationError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL (DATABASE_URL): {first_line(exc)}")
    except LockTimeout as exc:
        _fail(f"database migrations are locked by another process: {first_line(exc)}")


@api.command()
@click.argument("email", required=False)
@click.option("--all", "every_user", is_flag=True, help="Every user, one row each.")
@click.option("--month", help="YYYY-MM (default: this month, UTC).")
@click.option(
    "--format",
    "output",
    type=click.Choice(["text", "csv", "json"]),
    default="text",
    show_default=True,
)
def usage(email: str | None, every_user: bool, month: str | None, output: str) -> None:
    """Embeddings and tokens of a month, for billing: EMAIL's per key, or with --all one row per
    user (email, tier, embeddings, tokens, limit), the input of the month's invoices."""
    if (email is None) == (not every_user):
        raise click.UsageError("give an EMAIL or --all, not both")
    settings = load_settings(require_redis=False)
    if every_user:
        in_database(settings, lambda conn: _export_all(conn, settings, month, output))
        return

    def report(conn: psycopg.Connection) -> tuple[datetime, list[KeyUsage]]:
        start = parse_month(month)
        return start, monthly_usage(conn, email, start)

    start, rows = in_database(settings, report)
    if output == "text":
        _print_key_usage(normalize_email(email), start, rows)
        return
    records = [
        {
            "month": f"{start:%Y-%m}",
            "email": normalize_email(email),
            "key": row.key_prefix,
            "name": row.name,
            "embeddings": row.embeddings,
            "tokens": row.tokens,
        }
        for row in rows
    ]
    _write(records, output, ["month", "email", "key", "name", "embeddings", "tokens"])


def _print_key_usage(email: str, start: datetime, rows: list[KeyUsage]) -> None:
    click.echo(f"{email}  {start:%Y-%m}")
    click.echo(f"{'key':<14} {'name':<20} {'embeddings':>12} {'tokens':>14}")
    for row in rows:
        click.echo(
            f"{row.key_prefix or '(deleted)':<14} {row.name or '':<20} "
            f"{row.embeddings:>12} {row.tokens:>14}"
        )
    total_embeddings = sum(r.embeddings for r in rows)
    total_tokens = sum(r.tokens for r in rows)
    click.echo(f"{'total':<14} {'':<20} {total_embeddings:>12} {total_tokens:>14}")


USER_COLUMNS = ["month", "email", "tier", "embeddings", "tokens", "limit"]


def _export_all(
    conn: psycopg.Connection, settings: Settings, month: str | None, output: str
) -> None:
    start = parse_month(month)
    limits = settings.tier_limits
    records = (
        {
            "month": f"{start:%Y-%m}",
            "email": user.email,
            "tier": user.tier,
            "embeddings": user.embeddings,
            "tokens": user.tokens,
            # The user's tier and its limit today: the ledger keeps no history of either.
            "limit": limit_or_none(limits[user.tier]),
        }
        for user in all_users_usage(conn, start)
    )
    if output == "text":
        click.echo(f"{'email':<40} {'tier':<6} {'embeddings':>12} {'tokens':>14} {'limit':>12}")
        for record in records:
            limit = "unlimited" if record["limit"] is None else record["limit"]
            click.echo(
                f"{record['email']:<40} {record['tier']:<6} {record['embeddings']:>12} "
                f"{record['tokens']:>14} {limit:>12}"
            )
        return
    _write(records, output, USER_COLUMNS)


def _write(records: Iterable[dict[str, Any]], output: str, columns: list[str]) -> None:
    """CSV with a header line, or one JSON array, written a record at a time."""
    stream = click.get_text_stream("stdout")
    if output == "csv":
        writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return
    stream.write("[")
    for i, record in enumerate(records):
        stream.write(("," if i else "") + "\n" + json.dumps(record))
    stream.write("\n]\n")


@api.group()
def keys() -> None:
    """List and revoke API keys."""


@keys.command("list")
@click.argument("email")
def keys_list(email: str) -> None:
    """The keys of EMAIL (prefix, name, state, created, last used)."""
    settings = load_settings(require_redis=False)
    for key in in_database(settings, lambda conn: list_keys(conn, email)):
        last_used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
        click.echo(
            f"{key.key_prefix}\t{'active' if key.is_active else 'revoked'}\t"
            f"{key.created_at.isoformat(timespec='seconds')}\t{last_used}\t{key.name or ''}"
        )


@keys.command("revoke")
@click.argument("key_prefix")
def keys_revoke(key_prefix: str) -> None:
    """Revoke the key starting with KEY_PREFIX (refused within AUTH_CACHE_TTL seconds)."""
    settings = load_settings(require_redis=False)
    click.echo(f"revoked {in_database(settings, lambda conn: revoke_key(conn, key_prefix))}")


@click.command()
@_version_option("create_api_key")
@click.argument("email")
@click.argument("tier", required=False)
@click.option("--name", help="A label for the key, shown by `api keys list`.")
def create_api_key(email: str, tier: str | None, name: str | None) -> None:
    """Create (or update) the user EMAIL with TIER (free, pro or scale) and print a new key.

    The key is printed once, alone on stdout; only its hash is stored.
    """
    settings = load_settings(require_redis=False)
    migrate_or_exit(settings.database_url)
    created = in_database(
        settings, lambda conn: create_key(conn, email, tier, name, settings.api_key_prefix)
    )
    click.echo(created.key)
    verb = "created" if created.user_created else "updated"
    click.echo(
        f"# {verb} {created.email} ({created.tier}); key {created.key_prefix}... "
        f"Use it as: curl -H 'Authorization: Bearer <key>' ...",
        err=True,
    )
