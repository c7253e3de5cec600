"""scripts/releases.sh on a server-like tree: list, switch, prune and rollback of releases/<name>/
with `current` the symlink the unit runs (systemd/smally.service ExecStart)."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.buildinfo import release_name

ROOT = Path(__file__).resolve().parents[2]
# Built in this order; the names sort differently (0.10 after 0.9 only by build time).
BUILDS = [
    ("0.9.0", "aaaaaaaaaaaa", False, "2026-11-01T10:00:00Z"),
    ("0.10.0", "bbbbbbbbbbbb", True, "2026-11-02T10:00:00Z"),
    ("0.10.0", "bbbbbbbbbbbb", False, "2026-11-03T10:00:00Z"),
    ("0.2.0", "cccccccccccc", False, "2026-11-04T10:00:00Z"),
]
NAMES = [
    release_name({"version": v, "git_hash": h, "git_dirty": d, "build_timestamp": t})
    for v, h, d, t in BUILDS
]


def test_release_names() -> None:
    assert NAMES == [
        "0.9.0-aaaaaaaaaaaa-20261101T100000Z",
        "0.10.0-bbbbbbbbbbbb-dirty-20261102T100000Z",
        "0.10.0-bbbbbbbbbbbb-20261103T100000Z",
        "0.2.0-cccccccccccc-20261104T100000Z",
    ]
    # A source checkout (no build time) and no git at all.
    assert release_name({"version": "1.0.0", "git_hash": "dddddddddddd"}) == "1.0.0-dddddddddddd"
    assert release_name({"version": "1.0.0"}) == "1.0.0-unknown"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    app = tmp_path / "smally-api"
    (app / "scripts").mkdir(parents=True)
    for script in ("common.sh", "releases.sh"):
        shutil.copy(ROOT / "scripts" / script, app / "scripts" / script)
    for name in NAMES:
        release = app / "releases" / name
        release.mkdir(parents=True)
        (release / "api").write_text("#!/bin/sh\n")
        (release / "api").chmod(0o755)
    (app / ".env").write_text("API_PORT=1\n")
    return app


def releases(app: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(app / "scripts" / "releases.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
    )


def serving(app: Path) -> str:
    link = app / "current"
    assert link.is_symlink() and (link / "api").is_file()
    return Path(str(link.readlink())).name


def test_list_in_build_order_marks_the_serving_one(app_dir: Path) -> None:
    assert releases(app_dir, "switch", NAMES[2]).stdout == f"switched: {NAMES[2]}\n"
    assert releases(app_dir, "switch", NAMES[2]).stdout == f"unchanged: {NAMES[2]}\n"
    assert str((app_dir / "current").readlink()) == f"releases/{NAMES[2]}"  # relative
    listed = releases(app_dir, "list").stdout.splitlines()
    assert listed == [f"  {NAMES[0]}", f"  {NAMES[1]}", f"* {NAMES[2]} (serving)", f"  {NAMES[3]}"]


def test_switch_refuses_what_is_not_a_release(app_dir: Path) -> None:
    releases(app_dir, "switch", NAMES[0])
    for name in ("", "nope", "../releases", f"../releases/{NAMES[1]}", NAMES[1] + "x"):
        result = releases(app_dir, "switch", name)
        assert result.returncode != 0 and "no release" in result.stderr, name
    assert serving(app_dir) == NAMES[0]
    assert not (app_dir / "current.new").exists()


def test_prune_keeps_the_newest_and_never_the_serving_one(app_dir: Path) -> None:
    releases(app_dir, "switch", NAMES[0])  # rolled back to the oldest
    result = releases(app_dir, "prune", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"removed: {NAMES[1]}"]
    left = sorted(p.name for p in (app_dir / "releases").iterdir())
    assert left == sorted([NAMES[0], NAMES[2], NAMES[3]])
    assert releases(app_dir, "prune", "2").stdout == ""  # nothing more: changed=0 in ansible
    assert releases(app_dir, "prune", "0").returncode != 0
    assert serving(app_dir) == NAMES[0]


class Health(http.server.BaseHTTPRequestHandler):
    release = ""

    def do_GET(self) -> None:
        body = json.dumps(
            {"status": "healthy", "build": {"release": self.release}}, separators=(",", ":")
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving_health(app_dir: Path, host: str) -> Iterator[str]:
    """A /health on HOST that names the release `current` points to, as the restarted service
    would."""

    class Serving(Health):
        def do_GET(self) -> None:
            Health.release = serving(app_dir)
            super().do_GET()

    server = http.server.ThreadingHTTPServer((host, 0), Serving)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/health"
    finally:
        server.shutdown()


@pytest.fixture
def health(app_dir: Path) -> Iterator[str]:
    with serving_health(app_dir, "127.0.0.1") as url:
        yield url


def test_rollback_goes_to_the_previous_build_restarts_and_waits_for_it(
    app_dir: Path, health: str, tmp_path: Path
) -> None:
    calls = tmp_path / "systemctl.calls"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >>{calls}\n')
    systemctl.chmod(0o755)
    env = {"SMALLY_SYSTEMCTL": str(systemctl), "SMALLY_HEALTH_URL": health}
    releases(app_dir, "switch", NAMES[3])

    result = releases(app_dir, "rollback", **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"rollback: serving {NAMES[2]}"
    assert serving(app_dir) == NAMES[2]
    assert calls.read_text() == "restart smally\n"

    result = releases(app_dir, "rollback", NAMES[3], **env)  # and forward again, by name
    assert result.returncode == 0 and serving(app_dir) == NAMES[3], result.stderr

    releases(app_dir, "switch", NAMES[0])
    result = releases(app_dir, "rollback", **env)  # nothing older: says so, changes nothing
    assert result.returncode != 0 and "no release older" in result.stderr
    assert serving(app_dir) == NAMES[0]
    assert calls.read_text() == "restart smally\n" * 2


def test_rollback_probes_the_address_the_service_listens_on(app_dir: Path, tmp_path: Path) -> None:
    """A cluster's API host listens on its private address (API_HOST in its .env), not on
    127.0.0.1: the rollback waits for /health there."""
    releases(app_dir, "switch", NAMES[3])
    with serving_health(app_dir, "127.0.0.2") as url:
        port = url.rsplit(":", 1)[1].split("/")[0]
        (app_dir / ".env").write_text(f"API_HOST=127.0.0.2\nAPI_PORT={port}\n")
        result = releases(app_dir, "rollback", SMALLY_SYSTEMCTL="true", SMALLY_ROLLBACK_WAIT="10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"rollback: serving {NAMES[2]}"


def test_target_names_the_release_a_rollback_would_serve_and_changes_nothing(
    app_dir: Path,
) -> None:
    releases(app_dir, "switch", NAMES[3])
    assert releases(app_dir, "target").stdout == f"{NAMES[2]}\n"
    assert releases(app_dir, "target", NAMES[0]).stdout == f"{NAMES[0]}\n"
    missing = releases(app_dir, "target", "nope")
    assert missing.returncode != 0 and "no release 'nope'" in missing.stderr
    assert serving(app_dir) == NAMES[3]
    releases(app_dir, "switch", NAMES[0])
    oldest = releases(app_dir, "target")
    assert oldest.returncode != 0 and "no release older" in oldest.stderr


def test_rollback_fails_when_the_release_does_not_come_up(app_dir: Path, tmp_path: Path) -> None:
    releases(app_dir, "switch", NAMES[3])
    result = releases(
        app_dir,
        "rollback",
        SMALLY_SYSTEMCTL="true",
        SMALLY_HEALTH_URL="http://127.0.0.1:9/health",  # nothing answers
        SMALLY_ROLLBACK_WAIT="3",
    )
    assert result.returncode != 0 and "not healthy" in result.stderr


@pytest.mark.parametrize(
    ("script", "binary"), [("api.sh", "api"), ("create-api-key.sh", "create_api_key")]
)
def test_operator_scripts_run_the_serving_release_from_the_app_dir(
    app_dir: Path, script: str, binary: str
) -> None:
    """scripts/api.sh and create-api-key.sh (`make api`, `make create-key`): the binary of the
    release `current` points at, run where it finds the .env, with the operator's arguments."""
    shutil.copy(ROOT / "scripts" / script, app_dir / "scripts" / script)
    serving_release = app_dir / "releases" / NAMES[1]
    (app_dir / "current").symlink_to(serving_release.relative_to(app_dir))
    (serving_release / binary).write_text('#!/bin/sh\necho "$(readlink -f "$0") $(pwd) $*"\n')
    (serving_release / binary).chmod(0o755)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(app_dir / "scripts" / script), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "SMALLY_USER": user},
            check=False,
        )

    done = run("keys", "list", "a b@example.com")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{serving_release / binary} {app_dir} keys list a b@example.com\n"
    (app_dir / "current").unlink()
    done = run("keys", "list")
    assert done.returncode == 1
    assert f"no {app_dir}/current/{binary} (deploy first)" in done.stderr
