"""Operations files: scripts keep the database password off command lines; timeouts line up."""

import contextlib
import http.server
import inspect
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from app.config import Settings
from app.http.runner import SOCKET_BACKLOG
from app.http.workers import IDLE_SECONDS
from app.serving.usage import UsageRecorder
from tests.helpers import nginx_upstream, nginx_upstream_idle_seconds

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret:p@ss"  # a throwaway value the test looks for


def test_backup_keeps_password_off_the_command_line(tmp_path: Path) -> None:
    # A pg_dump on PATH that records its argv and the password libpq would get from the env.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    fake = bin_dir / "pg_dump"
    fake.write_text(
        '#!/usr/bin/env bash\nprintf "argv=%s\\n" "$*" >"$RECORD"\n'
        'printf "env=%s\\n" "${PGPASSWORD-}" >>"$RECORD"\necho "SELECT 1;"\n'
    )
    fake.chmod(0o755)
    backups = tmp_path / "backups"
    backups.mkdir()
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=postgresql://smally:s3cret%3Ap%40ss@127.0.0.1:5432/smally\n")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "SMALLY_ENV_FILE": str(env_file),
        "SMALLY_BACKUP_DIR": str(backups),
    }
    backup = ROOT / "scripts/backup.sh"
    subprocess.run(["bash", str(backup)], env=env, check=True, capture_output=True)
    lines = record.read_text().splitlines()
    print(lines[0])
    assert PASSWORD not in lines[0] and "s3cret" not in lines[0]
    assert "postgresql://smally@127.0.0.1:5432/smally" in lines[0]
    assert lines[1] == f"env={PASSWORD}"  # decoded for libpq


def test_nginx_drops_idle_connections_well_before_the_service_would() -> None:
    """An idle upstream connection that the service closes just as nginx sends a POST on it is
    a 502 that nobody resends (it may have been metered). So nginx keeps connections alive but
    drops an idle one well before the service would close it (IDLE_SECONDS), and a stopping
    worker waits that long for nginx to drop its idle ones itself (app/http/workers.py): a margin
    of at least 2 s for nginx's timers on a loaded machine."""
    conf = (ROOT / "nginx/smally.conf").read_text()
    upstream = nginx_upstream()
    assert re.search(r"^\s*keepalive \d+;", upstream, re.M), upstream
    assert 'proxy_set_header Connection "";' in conf
    assert "proxy_set_header Connection close;" not in conf
    nginx_idle = nginx_upstream_idle_seconds()
    print(f"nginx drops idle upstream connections after {nginx_idle} s, smally {IDLE_SECONDS} s")
    assert nginx_idle + 2 <= IDLE_SECONDS


def test_systemd_stop_timeout_covers_drain_and_ledger_flush() -> None:
    unit = (ROOT / "systemd/smally.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    assert stop
    drain = Settings.__dataclass_fields__["shutdown_timeout"].default
    flush = inspect.signature(UsageRecorder.stop).parameters["timeout"].default
    print(f"TimeoutStopSec {stop.group(1)} s; drain {drain} s + flush {flush} s")
    assert int(stop.group(1)) >= drain + flush + 10  # margin for the rest of shutdown


def _backup_age_line(tmp_path: Path, backups: Path) -> str:
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=postgresql://smally@127.0.0.1:1/smally\nAPI_PORT=1\n")
    env = {
        "PATH": os.environ["PATH"],
        "SMALLY_ENV_FILE": str(env_file),
        "SMALLY_BACKUP_DIR": str(backups),
        "SMALLY_BACKUP_MAX_AGE_HOURS": "26",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "scripts/health-check.sh")], env=env, capture_output=True, text=True
    )
    lines = [line for line in run.stdout.splitlines() if "backup-age" in line]
    assert len(lines) == 1, run.stdout
    print(lines[0])
    return lines[0]


def test_nginx_waits_for_a_request_queued_across_a_restart() -> None:
    """While the service restarts, a request waits in smally.socket's queue: nginx must wait as
    long as the old process may drain and the new one may take to start, not answer 504."""
    unit = (ROOT / "systemd/smally.service").read_text()
    start = re.search(r"^TimeoutStartSec=(\d+)$", unit, re.M)
    read = re.search(
        r"^\s*proxy_read_timeout (\d+)s;", (ROOT / "nginx/smally.conf").read_text(), re.M
    )
    assert start and read
    drain = Settings.__dataclass_fields__["shutdown_timeout"].default
    assert int(read.group(1)) >= drain + int(start.group(1))


def test_health_check_fails_on_a_missing_or_stale_backup(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    # None yet on a fresh install: not a failure until the directory is older than the limit.
    assert _backup_age_line(tmp_path, backups).startswith("PASS")
    old = time.time() - 30 * 3600
    os.utime(backups, (old, old))
    assert _backup_age_line(tmp_path, backups).startswith("FAIL")  # none in 30 h
    stale = backups / "smally-20260101T000000Z.sql.gz"
    stale.write_bytes(b"")
    os.utime(stale, (old, old))
    assert _backup_age_line(tmp_path, backups).startswith("FAIL")
    (backups / "smally-20260102T000000Z.sql.gz").write_bytes(b"")  # written now
    assert _backup_age_line(tmp_path, backups).startswith("PASS")


def _health_check(tmp_path: Path, roles: str, env_lines: str = "", **env: str) -> list[str]:
    """health-check.sh's check lines (name, then PASS/FAIL and detail) on a host of ROLES."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"DATABASE_URL=postgresql://smally@127.0.0.1:1/smally\n{env_lines}")
    run = subprocess.run(
        ["bash", str(ROOT / "scripts/health-check.sh")],
        env={
            "PATH": os.environ["PATH"],
            "SMALLY_ENV_FILE": str(env_file),
            "SMALLY_APP_DIR": str(tmp_path),
            "SMALLY_BACKUP_DIR": str(tmp_path / "backups"),
            "SMALLY_ROLES": roles,
            **env,
        },
        capture_output=True,
        text=True,
    )
    print(run.stdout)
    assert run.stdout.startswith(f"health-check: {os.uname().nodename}, roles: {roles}\n")
    return run.stdout.splitlines()[1:-1]


def _check_names(lines: list[str]) -> set[str]:
    return {line.split()[1] for line in lines}


@contextlib.contextmanager
def _healthy_service(host: str) -> Iterator[int]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "healthy"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_health_check_probes_the_address_the_service_listens_on(tmp_path: Path) -> None:
    # A cluster's API host listens on its private address only (API_HOST), never 127.0.0.1.
    with _healthy_service("127.0.0.2") as port:
        lines = _health_check(tmp_path, "api", f"API_HOST=127.0.0.2\nAPI_PORT={port}\n")
    health = [line for line in lines if line.split()[1] == "health"]
    assert health == [f"PASS  health         http://127.0.0.2:{port}/health is healthy"]


def test_health_check_checks_each_role_only_where_it_runs(tmp_path: Path) -> None:
    everywhere = {"disk", "memory"}
    api = {"service", "health", "postgresql", "redis"}
    assert _check_names(_health_check(tmp_path, "api")) == api | everywhere
    edge_and_data = {"nginx", "nginx-health", "data-servers", "data-postgres"}
    assert _check_names(_health_check(tmp_path, "edge data")) == edge_and_data | everywhere
    assert _check_names(_health_check(tmp_path, "backup")) == {"backups", "backup-age"} | everywhere


def test_health_check_passes_an_api_host_held_down_and_says_so(tmp_path: Path) -> None:
    mark = tmp_path / "host-down"
    mark.touch()
    lines = _health_check(tmp_path, "api", SMALLY_HOST_DOWN_FILE=str(mark))
    service = [line for line in lines if line.split()[1] in ("service", "health")]
    assert len(service) == 1 and service[0].startswith(
        "PASS  service        held down by make host-down"
    )


def test_unit_runs_the_current_release_on_the_socket_systemd_holds() -> None:
    unit = (ROOT / "systemd/smally.service").read_text()
    assert re.search(r"^ExecStart=/home/smally/smally-api/current/api$", unit, re.M)
    # .env stays in the app directory; the read-only bind covers it, the releases and `current`.
    assert re.search(r"^WorkingDirectory=/home/smally/smally-api$", unit, re.M)
    assert re.search(r"^BindReadOnlyPaths=/home/smally/smally-api$", unit, re.M)
    assert re.search(r"^Requires=smally\.socket$", unit, re.M)
    assert re.search(r"^After=smally\.socket ", unit, re.M)
    socket_unit = (ROOT / "systemd/smally.socket").read_text()
    # 127.0.0.1 on a single server, the private address on a cluster's API host.
    assert re.search(
        r"^ListenStream=\{\{ smally_api_listen \}\}:\{\{ smally_api_port \}\}$", socket_unit, re.M
    )
    variables = (ROOT / "ansible/vars/smally.yml").read_text()
    assert "smally_api_listen: \"{{ '127.0.0.1' if smally_api_local else" in variables
    # hypercorn listen()s again on the socket: with the same backlog, not its default of 100.
    backlog = re.search(r"^Backlog=(\d+)$", socket_unit, re.M)
    assert backlog and int(backlog.group(1)) == SOCKET_BACKLOG
    assert not re.search(r"^Accept=yes", socket_unit, re.M)  # one service, not one per connection


def test_nginx_never_sends_a_post_twice() -> None:
    conf = (ROOT / "nginx/smally.conf").read_text()
    retries = re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", conf, re.M)
    assert retries == ["error timeout"]  # not non_idempotent: /v1/ POSTs are metered


def test_unit_raises_the_open_files_limit() -> None:
    unit = (ROOT / "systemd/smally.service").read_text()
    assert re.search(r"^LimitNOFILE=65536$", unit, re.M)


def test_config_comments_name_files_that_exist() -> None:
    """Comments that send the operator to a repository file point at one that exists."""
    named = re.compile(
        r"(?<![\w/.-])((?:ansible|nginx|systemd|scripts)/[\w./-]+\.(?:yml|conf|service|socket|sh|j2))"
    )
    for path in (
        "nginx/smally.conf",
        "ansible/inventory/hosts.example.yml",
        "ansible/site.yml",
        "systemd/smally.socket",
    ):
        for name in named.findall((ROOT / path).read_text()):
            # Files the operator makes from an example (their inventory, vault) are git-ignored.
            ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", name])
            assert ignored.returncode == 0 or (ROOT / name).exists(), f"{path} names {name}"
