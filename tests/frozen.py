"""Running the frozen binaries the way the production server does: two files and a model in an
otherwise empty directory, a `.env`, no Python and no virtualenv on PATH."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import BIN, REPO, SMALLY_VARS, ApiProcess, free_port

PROGRAMS = ("api", "create_api_key")
MODEL_NAME = "all-MiniLM-L6-v2"
GLIBC_CEILING = "2.35"  # Ubuntu 22.04, the oldest target the binaries claim


def _load_glibc_check():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("glibc_check", REPO / "build" / "glibc_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_glibc_check = _load_glibc_check()
ceiling = _glibc_check.ceiling  # (highest GLIBC_ version, files needing it) of a one-file binary
version_key = _glibc_check.version_key

VERSION_LINE = re.compile(
    r"^(?P<program>\w+) (?P<version>\d+\.\d+\.\d+\S*) "
    r"\(git (?P<hash>[0-9a-f]{12})(?P<dirty>-dirty)?, (?P<built>\d{4}-\d\d-\d\dT[\d:]+Z), "
    r"lock (?P<lock>[0-9a-f]{12}), release (?P<release>[\w.-]+)\)$"
)


def make(*args: str, env: dict[str, str] | None = None, timeout: float = 1200) -> str:
    """Run `make ARGS` in the repository; returns its output, fails the test on an error."""
    result = subprocess.run(
        ["make", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stdout[-6000:]}"
    return result.stdout


def lock_sha256() -> str:
    """The sha256 of the repository's uv.lock, which a build records (BUILD.json, --version)."""
    return hashlib.sha256((REPO / "uv.lock").read_bytes()).hexdigest()


def git_head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a server without our Python: no venv on PATH, no PYTHONPATH, none of
    our settings (they come from `.env`)."""
    dropped = {*SMALLY_VARS, "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    path = [
        p
        for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if p and Path(p).resolve() != BIN.resolve() and not p.startswith(str(REPO))
    ]
    env["PATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


def deploy(dist: Path, into: Path, settings: dict[str, str]) -> Path:
    """Copy the binaries and the model into the empty directory `into`, with `.env` alone."""
    into.mkdir(parents=True)
    assert not any(into.iterdir())
    for program in PROGRAMS:
        shutil.copy2(dist / program, into / program)
    shutil.copytree(dist / "models" / MODEL_NAME, into / "models" / MODEL_NAME)
    (into / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    assert sorted(p.name for p in into.iterdir()) == [".env", "api", "create_api_key", "models"]
    return into


def deploy_on_servers(
    dist: Path, into: Path, database_url: str, redis_url: str
) -> tuple[Path, int]:
    """`deploy` with a `.env` naming the database, Redis, a free port and the model beside the
    binaries, as the playbook writes it; returns the directory and the port."""
    port = free_port()
    settings = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "MODEL_PATH": f"models/{MODEL_NAME}",
    }
    return deploy(dist, into, settings), port


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class RootPython:
    """Debian's python3.11 in the build root of an architecture (build/debian-root.sh): what
    the frozen binaries must carry."""

    version: str  # its sys.version
    package: str  # "libpython3.11 <Debian version>"
    library_build_id: str  # the GNU build ID of its libpython3.11.so.1.0


def root_python(arch: str) -> RootPython:
    script = str(REPO / "build" / "debian-root.sh")
    root = Path(subprocess.run([script, arch, "path"], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip

    def inside(*args: str) -> str:
        done = subprocess.run([script, arch, "exec", *args], capture_output=True, text=True,
                              timeout=600, check=True)  # fmt: skip
        return done.stdout.strip()

    version = inside("python3.11", "-c", "import sys; print(sys.version)")
    package = inside("dpkg-query", "--show", "--showformat=${Version}", "libpython3.11")
    multiarch = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[arch]
    library = root / "usr/lib" / multiarch / "libpython3.11.so.1.0"
    return RootPython(version, f"libpython3.11 {package}", build_id(library))


def build_id(elf: Path) -> str:
    """The GNU build ID of an ELF file: the same for a library and its stripped copy."""
    notes = subprocess.run(["readelf", "--notes", str(elf)], capture_output=True, text=True,
                           check=True).stdout  # fmt: skip
    found = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert found, notes
    return found.group(1)


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its children (a one-file binary is a bootloader + child)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@dataclass
class FrozenApi(ApiProcess):
    """The deployed `api` (in `workdir`), its port set in `.env`, its log kept out of `workdir`
    (pass log_dir)."""

    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.executable = self.workdir / "api"

    def process_env(self) -> dict[str, str]:
        return self.env  # API_PORT comes from `.env`, as on the server

    def start(self, *args: str) -> FrozenApi:
        self.started_at = time.monotonic()
        super().start(*args)
        return self

    def time_to_healthy(self, timeout: float) -> tuple[float, dict]:
        health = self.wait_healthy(timeout=timeout)
        return time.monotonic() - self.started_at, health


def embed_latency_ms(client: httpx.Client, count: int) -> list[float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        response = client.post("/v1/embed", json={"text": f"latency probe number {i}"})
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    return sorted(times)
