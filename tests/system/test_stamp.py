"""`make deploy` refuses a stale dist/ (build/stamp.py): a build stamped with another commit,
other uncommitted changes or another uv.lock than the working tree's, or with no stamp at all;
ALLOW_STALE_DIST=1 deploys it anyway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git checkout with the stamp script, a lock and a build in dist/, stamped by the same
    code as build/build_binaries.py's."""
    repo = tmp_path / "repo"
    (repo / "build").mkdir(parents=True)
    for name in ("build/stamp.py", "build/lock.py", "uv.lock"):
        shutil.copy(REPO / name, repo / name)
    (repo / "app.py").write_text("print('v1')\n")
    git(repo, "init", "--quiet")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "one")
    dist = repo / "dist"
    dist.mkdir()
    (dist / "api").write_text("binary")
    stamp(repo, dist)
    return repo


def stamp(repo: Path, dist: Path) -> dict[str, object]:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import stamp; "
        "stamp.write(__import__('pathlib').Path(sys.argv[2]), "
        "{**stamp.working_tree(), 'version': '0.1.0'}, 'x86_64')"
    )
    subprocess.run([sys.executable, "-c", code, str(repo / "build"), str(dist)], check=True)
    return json.loads((dist / "BUILD.json").read_text())


def check(repo: Path, allow: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_STALE_DIST"}
    if allow is not None:
        env["ALLOW_STALE_DIST"] = allow
    return subprocess.run(
        [sys.executable, "build/stamp.py", "check", "dist", "dist/arm64"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_build_of_the_working_tree_is_deployed(repo: Path) -> None:
    written = json.loads((repo / "dist" / "BUILD.json").read_text())
    assert written["git_hash"] == git(repo, "rev-parse", "--short=12", "HEAD")
    assert written["git_dirty"] is False and written["arch"] == "x86_64"
    assert len(str(written["lock_sha256"])) == 64
    checked = check(repo)
    assert checked.returncode == 0, checked.stderr
    assert "dist: built from this working tree" in checked.stdout


def test_a_build_of_an_older_commit_is_refused_unless_allowed(repo: Path) -> None:
    (repo / "app.py").write_text("print('v2')\n")
    git(repo, "commit", "--quiet", "-am", "two")
    refused = check(repo)
    assert refused.returncode == 1
    assert "refusing to deploy: a stale build would be deployed" in refused.stderr
    assert "dist: built from commit" in refused.stderr
    assert "make deploy ALLOW_STALE_DIST=1" in refused.stderr
    allowed = check(repo, allow="1")
    assert allowed.returncode == 0 and "WARNING: a stale build" in allowed.stderr
    assert check(repo, allow="0").returncode == 1


def test_uncommitted_changes_and_a_new_lock_make_a_build_stale(repo: Path) -> None:
    (repo / "app.py").write_text("print('edited')\n")
    assert "uncommitted changes" in check(repo).stderr
    stamp(repo, repo / "dist")  # a build of this dirty tree is the tree's
    assert check(repo).returncode == 0
    (repo / "app.py").write_text("print('edited again')\n")  # still dirty, other changes
    assert "uncommitted changes (their content)" in check(repo).stderr
    git(repo, "checkout", "--quiet", "app.py")
    (repo / "uv.lock").write_text((repo / "uv.lock").read_text() + "\n")
    git(repo, "commit", "--quiet", "-am", "a new lock")
    stamp(repo, repo / "dist")
    assert check(repo).returncode == 0
    with (repo / "uv.lock").open("a") as lock:
        lock.write("\n")
    assert "built from uv.lock" in check(repo).stderr


def test_an_unstamped_build_is_refused_and_each_architecture_is_checked(repo: Path) -> None:
    arm64 = repo / "dist" / "arm64"
    arm64.mkdir()
    (arm64 / "api").write_text("binary")
    refused = check(repo)
    assert refused.returncode == 1
    assert "dist/arm64: no readable BUILD.json" in refused.stderr
    stamp(repo, arm64)
    assert check(repo).returncode == 0
    shutil.rmtree(repo / "dist")
    assert check(repo).returncode == 0  # nothing built: the playbook says what to build


def test_make_deploy_checks_the_stamps_before_the_playbook() -> None:
    planned = subprocess.run(
        ["make", "-n", "deploy", "ALLOW_STALE_DIST=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    first = next(
        i for i, line in enumerate(planned) if "build/stamp.py check dist dist/arm64" in line
    )
    playbook = next(i for i, line in enumerate(planned) if "ansible-playbook" in line)
    assert first < playbook and "ALLOW_STALE_DIST=1" in planned[first]
