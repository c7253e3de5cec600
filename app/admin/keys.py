"""API keys: generation, hashing, and the operator's account commands (create, list, revoke).

A key is `<prefix>` + 64 hex characters (256 bits from `secrets`). Only its SHA-256 is stored,
with a short display prefix; the plain key exists only in `create_api_key`'s output.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from app.config import TIERS
from app.serving.auth import hash_key

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
# How much of the key (after its prefix) is kept for display: enough to tell keys apart.
_DISPLAY_CHARS = 8


class AccountError(Exception):
    """Bad operator input (email, tier, unknown key); the message is shown as is."""


def generate_key(prefix: str) -> str:
    return prefix + secrets.token_hex(32)


def display_prefix(key: str, prefix: str) -> str:
    return key[: len(prefix) + _DISPLAY_CHARS]


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 254 or not _EMAIL.match(email):
        raise AccountError(f"not a valid email address: {email!r}")
    return email


def check_tier(tier: str) -> str:
    tier = tier.strip().lower()
    if tier not in TIERS:
        raise AccountError(f"unknown tier {tier!r}: choose one of {', '.join(TIERS)}")
    return tier


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: str
    key_prefix: str
    email: str
    tier: str
    user_created: bool


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_prefix: str
    name: str | None
    is_active: bool
    created_at: datetime
    last_used_at: datetime | None


def create_key(
    conn: psycopg.Connection, email: str, tier: str | None, name: str | None, prefix: str
) -> CreatedKey:
    """Create the user if new (tier default free), update its tier if given, add a key."""
    email = normalize_email(email)
    tier = check_tier(tier) if tier is not None else None
    key = generate_key(prefix)
    with conn.transaction():
        row = conn.execute(
            """
            INSERT INTO users (email, tier) VALUES (%(email)s, coalesce(%(tier)s, 'free'))
            ON CONFLICT (email) DO UPDATE
               SET tier = coalesce(%(tier)s, users.tier), updated_at = now()
            RETURNING id, tier, (xmax = 0) AS inserted
            """,
            {"email": email, "tier": tier},
        ).fetchone()
        assert row is not None
        user_id, user_tier, inserted = row
        conn.execute(
            "INSERT INTO api_keys (user_id, key_hash, key_prefix, name) VALUES (%s, %s, %s, %s)",
            (user_id, hash_key(key), display_prefix(key, prefix), name),
        )
    return CreatedKey(key, display_prefix(key, prefix), email, user_tier, bool(inserted))


def list_keys(conn: psycopg.Connection, email: str) -> list[KeyInfo]:
    email = normalize_email(email)
    if conn.execute("SELECT 1 FROM users WHERE email = %s", (email,)).fetchone() is None:
        raise AccountError(f"no user {email}")
    rows = conn.execute(
        """
        SELECT k.key_prefix, k.name, k.is_active, k.created_at, k.last_used_at
          FROM api_keys k JOIN users u ON u.id = k.user_id
         WHERE u.email = %s ORDER BY k.created_at
        """,
        (email,),
    ).fetchall()
    return [KeyInfo(*row) for row in rows]


def revoke_key(conn: psycopg.Connection, key_prefix: str) -> str:
    """Deactivate the key with this display prefix; refuses an empty or ambiguous prefix."""
    if not key_prefix.strip():
        raise AccountError("give the key's prefix, as `api keys list` shows it")
    with conn.transaction():
        # starts_with, not LIKE: the default prefix "sk_" holds a LIKE wildcard. A whole key
        # pasted by mistake is matched by its hash.
        rows = conn.execute(
            "SELECT id, key_prefix FROM api_keys"
            " WHERE starts_with(key_prefix, %s) OR key_hash = %s",
            (key_prefix, hash_key(key_prefix)),
        ).fetchall()
        if not rows:
            raise AccountError(f"no key starts with {key_prefix!r}")
        if len(rows) > 1:
            raise AccountError(f"{len(rows)} keys start with {key_prefix!r}; give more of it")
        conn.execute("UPDATE api_keys SET is_active = FALSE WHERE id = %s", (rows[0][0],))
    return str(rows[0][1])
