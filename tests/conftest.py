"""Real PostgreSQL and Redis for the whole run: throwaway embedded servers from the pip wheels,
or the servers named by TEST_DATABASE_URL / TEST_REDIS_URL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dev.launcher import EmbeddedServers
from dev.servers import LocalPostgres, LocalRedis
from tests.helpers import MODEL_PATH, REFERENCE_PATH, ApiProcess, base_env, create_key, new_database


@dataclass
class Servers:
    postgres_url: str
    redis_url: str
    postgres: LocalPostgres | None = None
    redis: LocalRedis | None = None

    def new_database(self) -> str:
        return new_database(self.postgres_url)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    if not (MODEL_PATH / "manifest.json").exists():
        pytest.exit(f"no model at {MODEL_PATH}: run `make model` (make test does)", returncode=2)
    if not REFERENCE_PATH.exists():
        pytest.exit(f"reference vectors missing: {REFERENCE_PATH}", returncode=2)
    named = {
        "DATABASE_URL": os.environ.get("TEST_DATABASE_URL", ""),
        "REDIS_URL": os.environ.get("TEST_REDIS_URL", ""),
    }
    with EmbeddedServers(tmp_path_factory.mktemp("servers"), persist_redis=False) as embedded:
        env = embedded.start(named)
        yield Servers(env["DATABASE_URL"], env["REDIS_URL"], embedded.postgres, embedded.redis)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="module")
def module_env(servers: Servers) -> dict[str, str]:
    """Settings for a service on a database of its own (one per test module)."""
    return base_env(DATABASE_URL=servers.new_database(), REDIS_URL=servers.redis_url)


@pytest.fixture(scope="module")
def api(
    module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """A running service for the module's tests."""
    process = ApiProcess(module_env, tmp_path_factory.mktemp("api")).start()
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def key(api: ApiProcess) -> str:
    return create_key(api.env, api.workdir, "user@example.com", "free")
