"""What a customer used in a month, per key: the numbers an invoice is made from."""

from __future__ import annotations

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
