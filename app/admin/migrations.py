"""The embedded schema migrations (migrations/*.sql), applied with yoyo.

The connection string goes to libpq untouched (it may be any libpq URI, including the unix-socket
form `postgresql://user:@/db?host=/dir`); yoyo is given ready connections rather than the URL,
so its own URL parser never decides where we connect.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri

from app.config import first_line

log = logging.getLogger(__name__)

# Taken around every migration run: serialises `api` processes starting at once against an
# empty database, before yoyo's own lock table even exists.
_MIGRATION_LOCK_ID = 0x5A4D41_4C4C59  # "ZMALLY"
INITIAL_MIGRATION = "0001_initial"


def migrations_dir() -> Path:
    # Frozen binaries carry the directory inside the bundle; never read the source tree there.
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        return Path(bundle) / "migrations"
    return Path(__file__).resolve().parents[2] / "migrations"


class _LibpqBackend(PostgresqlPsycopgBackend):
    """yoyo's psycopg 3 backend, connecting with our conninfo string instead of its parsed URL."""

    conninfo = ""

    def connect(self, dburi):  # type: ignore[no-untyped-def]
        return psycopg.connect(self.conninfo, autocommit=True)


def _backend(database_url: str) -> _LibpqBackend:
    backend_class = type("Backend", (_LibpqBackend,), {"conninfo": database_url})
    backend = backend_class(parse_uri("postgresql+psycopg:///smally"), "_yoyo_migration")
    backend.init_database()  # what yoyo's get_backend() does: creates its lock table
    return backend


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    id: str
    applied_at: datetime | None


@contextlib.contextmanager
def _migrating(database_url: str) -> Iterator[_LibpqBackend]:
    """yoyo's backend, holding the migration lock: one process migrates at a time."""
    backend = _backend(database_url)
    try:
        backend.execute(f"SELECT pg_advisory_lock({_MIGRATION_LOCK_ID})")
        try:
            # Holding the advisory lock proves no other process is migrating, so a row in
            # yoyo's lock table can only be left by a process killed mid-migration: without
            # this, every later start would wait 10 s and fail on it (LockTimeout), forever.
            stale = backend.execute(f"DELETE FROM {backend.lock_table_quoted} RETURNING pid")
            for (pid,) in stale.fetchall():
                log.warning("cleared a stale migration lock", extra={"pid": pid})
            with backend.lock():
                yield backend
        finally:
            backend.execute(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK_ID})")
    finally:
        backend.connection.close()


def apply_migrations(database_url: str) -> list[str]:
    """Apply pending migrations; returns the ids applied. Safe to call from many processes."""
    migrations = read_migrations(str(migrations_dir()))
    with _migrating(database_url) as backend:
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    if applied:
        log.info("applied migrations", extra={"migrations": applied})
    return applied


class MigrationError(Exception):
    """A rollback that cannot be done as asked; the message says why."""


def rollback_migrations(database_url: str, *, to: str | None = None) -> list[str]:
    """Revert the newest applied migration with its .rollback.sql, or with `to` every migration
    applied after that one (which stays). Returns the ids reverted, newest first.

    The initial schema is never reverted: its rollback drops every table, billing history
    included (restore a backup instead).
    """
    migrations = read_migrations(str(migrations_dir()))
    with _migrating(database_url) as backend:
        applied = list(backend.to_rollback(migrations))  # newest first
        ids = [m.id for m in applied]
        if to is None:
            chosen = applied[:1]
        elif to in ids:
            chosen = applied[: ids.index(to)]
        else:
            raise MigrationError(f"{to} is not an applied migration (applied: {', '.join(ids)})")
        if not chosen:
            raise MigrationError("nothing to roll back")
        if any(m.id == INITIAL_MIGRATION for m in chosen):
            raise MigrationError(
                f"{INITIAL_MIGRATION} is not rolled back: it would drop every table and the "
                "billing history (restore a backup instead)"
            )
        for migration in chosen:
            # One at a time, each in its own transaction; a failing step stops here with the
            # error (yoyo's rollback_migrations() would skip it and carry on).
            try:
                backend.rollback_one(migration)
            except psycopg.Error as exc:
                raise MigrationError(
                    f"rolling back {migration.id} failed: {first_line(exc)}"
                ) from None
            log.warning("rolled back a migration", extra={"migration": migration.id})
    return [m.id for m in chosen]


def migration_status(database_url: str) -> list[MigrationStatus]:
    """Every migration, applied (with when) or pending. Reads only: it never goes through yoyo's
    backend, whose set-up creates yoyo's own tables, and it runs in a read-only session, so
    looking at a fresh database leaves it empty."""
    migrations = read_migrations(str(migrations_dir()))
    with psycopg.connect(
        database_url, autocommit=True, options="-c default_transaction_read_only=on"
    ) as conn:
        # Resolved through search_path, as yoyo's own unqualified table name is.
        exists = conn.execute("SELECT to_regclass('_yoyo_migration') IS NOT NULL").fetchone()
        rows = (
            conn.execute("SELECT migration_id, applied_at_utc FROM _yoyo_migration").fetchall()
            if exists and exists[0]
            else []
        )
    applied = {row[0]: row[1] for row in rows}
    return [MigrationStatus(m.id, applied.get(m.id)) for m in migrations]
