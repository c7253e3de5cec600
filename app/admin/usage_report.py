"""What customers used in a month: per key of one user, or one row per user (the input of the
month's invoices)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from app.admin.keys import AccountError, normalize_email
from app.serving.quota import month_bounds


@dataclass(frozen=True, slots=True)
class KeyUsage:
    key_prefix: str | None  # None: rows of keys deleted since
    name: str | None
    embeddings: int
    tokens: int


def parse_month(text: str | None) -> datetime:
    """'YYYY-MM' (default: the current month, UTC) -> the month's first instant."""
    if text is None:
        return month_bounds(datetime.now(UTC))[0]
    try:
        return datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise AccountError(f"month must look like 2026-11, got {text!r}") from None


def monthly_usage(conn: psycopg.Connection, email: str, month: datetime) -> list[KeyUsage]:
    email = normalize_email(email)
    user = conn.execute("SELECT id FROM users WHERE email = %s", (email,)).fetchone()
    if user is None:
        raise AccountError(f"no user {email}")
    start, end = month_bounds(month)
    rows = conn.execute(
        """
        SELECT k.key_prefix, k.name, sum(u.embeddings_count), sum(u.tokens)
          FROM usage u LEFT JOIN api_keys k ON k.id = u.api_key_id
         WHERE u.user_id = %s AND u.created_at >= %s AND u.created_at < %s
         GROUP BY k.key_prefix, k.name ORDER BY k.key_prefix NULLS LAST
        """,
        (user[0], start, end),
    ).fetchall()
    return [KeyUsage(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class UserUsage:
    email: str
    tier: str
    embeddings: int
    tokens: int


# One row per user that existed before the month's end, its totals summed by PostgreSQL: the
# client holds one user's row at a time, however many ledger rows the month has.
_ALL_USERS = """
SELECT u.email, u.tier, coalesce(m.embeddings, 0), coalesce(m.tokens, 0)
  FROM users u
  LEFT JOIN (SELECT user_id, sum(embeddings_count) AS embeddings, sum(tokens) AS tokens
               FROM usage WHERE created_at >= %(start)s AND created_at < %(end)s
              GROUP BY user_id) m ON m.user_id = u.id
 WHERE u.created_at < %(end)s OR m.user_id IS NOT NULL
 ORDER BY u.email
"""


def all_users_usage(conn: psycopg.Connection, month: datetime) -> Iterator[UserUsage]:
    """Every user's totals of `month`, streamed from a server-side cursor."""
    start, end = month_bounds(month)
    with conn.transaction(), conn.cursor(name="usage_export") as cursor:
        cursor.itersize = 1000
        cursor.execute(_ALL_USERS, {"start": start, "end": end})
        for email, tier, embeddings, tokens in cursor:
            yield UserUsage(email, tier, int(embeddings), int(tokens))
