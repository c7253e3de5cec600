"""The unit layer: the service's parts in this process, against the session's real PostgreSQL and
Redis (tests/conftest.py) and the real model; never an `api` process."""

from __future__ import annotations

import uuid

import pytest

from app.admin.migrations import apply_migrations
from tests.conftest import Servers


@pytest.fixture(scope="module")
def database_url(servers: Servers) -> str:
    """A migrated database of the module's own."""
    url = servers.new_database()
    apply_migrations(url)
    return url


@pytest.fixture
def key_prefix() -> str:
    """A Redis key space of the test's own (the session's Redis is shared)."""
    return f"unit-{uuid.uuid4().hex[:8]}:"
