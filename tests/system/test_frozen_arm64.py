"""The aarch64 build (`make build ARCH=arm64`, the Docker-free route) and its `api` run under
qemu-user against the same real PostgreSQL and Redis. Slow: `make test-arm64` runs it (.ci/run
does, after `make test`); it needs root, for the arm64 root and binfmt_misc."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import Servers
from tests.frozen import (
    GLIBC_CEILING,
    PROGRAMS,
    VERSION_LINE,
    FrozenApi,
    bare_env,
    ceiling,
    deploy_on_servers,
    git_head,
    lock_sha256,
    make,
    root_python,
    rss_kib,
    run,
    version_key,
)
from tests.helpers import REPO, cosine, load_reference

# Selected by `make test-arm64` (-m arm64); the default run leaves the marker out (pyproject).
# It needs root, for the arm64 root and binfmt_misc: without it the build says so and fails.
pytestmark = [pytest.mark.slow, pytest.mark.arm64]

DIST = REPO / "dist" / "arm64"
ARM64_ROOT = Path(
    os.environ.get("SMALLY_ARM64_ROOT") or Path.home() / ".cache" / "smally" / "arm64-root"
)


@pytest.fixture(scope="module")
def dist() -> Path:
    started = time.monotonic()
    # From nothing, debootstrap and the locked venv under qemu-user took ~26 min on a loaded
    # 2-core machine, before PyInstaller; with the root cached the build is ~10 min there. The
    # timeout only catches a hang.
    output = make(
        "build", "ARCH=arm64", env={**os.environ, "SMALLY_BUILD_ROUTE": "root"}, timeout=3000
    )
    print(f"\nmake build ARCH=arm64: {time.monotonic() - started:.0f} s")
    assert "route root" in output
    for program in PROGRAMS:
        assert (DIST / program).is_file()
    return DIST


def test_arm64_binaries_are_aarch64_and_need_no_newer_glibc(dist: Path) -> None:
    for program in PROGRAMS:
        described = run(["file", str(dist / program)], REPO, bare_env())
        assert "ELF 64-bit" in described.stdout and "ARM aarch64" in described.stdout
        highest, culprits = ceiling(dist / program)
        assert version_key(highest) <= version_key(GLIBC_CEILING), (program, highest, culprits)


def test_arm64_api_serves_under_qemu(dist: Path, servers: Servers, tmp_path: Path) -> None:
    database_url = servers.new_database()
    workdir, port = deploy_on_servers(dist, tmp_path / "srv", database_url, servers.redis_url)
    # binfmt_misc hands the aarch64 executables to qemu-aarch64-static; QEMU_LD_PREFIX gives
    # it the arm64 root's dynamic loader and system libraries (libstdc++, ...).
    env = bare_env(QEMU_LD_PREFIX=str(ARM64_ROOT))
    shown = run(["./api", "--version"], workdir, env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    match = VERSION_LINE.match(shown.stdout.strip())
    assert match and match["hash"] == git_head(), shown.stdout
    assert match["lock"] == lock_sha256()[:12]
    stamp = json.loads((dist / "BUILD.json").read_text())
    assert (stamp["arch"], stamp["lock_sha256"]) == ("aarch64", lock_sha256())

    created = run(["./create_api_key", "arm64@example.com"], workdir, env, timeout=300)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"sk_[0-9a-f]{64}", key)

    api = FrozenApi(env, workdir, port=port, log_dir=tmp_path).start()
    try:
        startup, health = api.time_to_healthy(timeout=600)
        assert health["status"] == "healthy"
        # Debian's python3.11 of the arm64 root, named in the stamp, is the one running.
        debian = root_python("arm64")
        assert (stamp["python"], stamp["python_package"]) == (debian.version, debian.package)
        assert (health["build"]["python"], health["build"]["python_package"]) == (
            debian.version,
            debian.package,
        )
        case = load_reference()["cases"][0]
        with api.client(key) as client:
            started = time.perf_counter()
            body = client.post("/v1/embed", json={"text": case["text"]}).json()
            latency = time.perf_counter() - started
        assert body["tokens"] == case["tokens"]
        assert cosine(body["embedding"], case["embedding"]) >= 0.99999
        rss = rss_kib(api.process.pid)
    finally:
        code = api.stop(signal.SIGTERM, timeout=120)
    print(
        f"\narm64 api under qemu: {startup:.1f} s exec to healthy, RSS {rss / 1024:.0f} MiB, "
        f"one embed {latency * 1000:.0f} ms"
    )
    assert code == 0, api.logs()[-3000:]
