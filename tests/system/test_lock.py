"""The lock: uv.lock agrees with pyproject.toml, requirements/*.txt with uv.lock, and every install
path installs from them with hashes required (build/lock.py; README "The lock")."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.helpers import REPO


def lock_py(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "build" / "lock.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_the_lock(tmp_path: Path) -> Path:
    """What build/lock.py reads, in a directory of its own, to change without touching the repo."""
    repo = tmp_path / "repo"
    for name in ("pyproject.toml", "uv.lock", "README.md", "build/lock.py", "requirements"):
        source, target = REPO / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return repo


def test_the_lock_matches_pyproject_and_the_exported_files() -> None:
    checked = lock_py(REPO, "check")
    assert checked.returncode == 0, checked.stderr


def test_a_change_to_pyproject_without_make_lock_fails_the_check(tmp_path: Path) -> None:
    repo = copy_of_the_lock(tmp_path)
    pyproject = repo / "pyproject.toml"
    text = pyproject.read_text()
    assert '"click>=8.1",' in text
    pyproject.write_text(text.replace('"click>=8.1",', '"click>=8.1",\n    "six>=1.16",'))
    checked = lock_py(repo, "check")
    assert checked.returncode == 1
    assert "uv.lock does not match pyproject.toml: run `make lock`" in checked.stderr


def test_an_edited_exported_file_fails_the_check(tmp_path: Path) -> None:
    repo = copy_of_the_lock(tmp_path)
    build = repo / "requirements" / "build.txt"
    build.write_text(re.sub(r"(?m)^starlette==\S+", "starlette==0.40.0", build.read_text()))
    checked = lock_py(repo, "check")
    assert checked.returncode == 1
    assert "requirements/build.txt is not what uv.lock exports" in checked.stderr


PIN = re.compile(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)")


def test_every_pin_is_the_locks_and_has_hashes() -> None:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked = {(p["name"], p["version"]) for p in lock["package"]}
    for name in ("dev.txt", "build.txt", "bench.txt"):
        text = (REPO / "requirements" / name).read_text()
        pins = PIN.findall(text)
        assert pins and set(pins) <= locked, name
        blocks = PIN.split(text)[1:]  # name, version, the rest of its entry: markers, hashes
        assert all("--hash=sha256:" in rest for rest in blocks[2::3]), name
    build = {pin for pin, _ in PIN.findall((REPO / "requirements" / "build.txt").read_text())}
    assert {"pyinstaller", "onnxruntime", "starlette"} <= build
    assert not {"pytest", "ruff", "uv", "matplotlib"} & build  # the frozen builds: no dev tools
    # The aarch64 wheels are locked too: the ARM64 routes install the same file.
    onnxruntime = next(p for p in lock["package"] if p["name"] == "onnxruntime")
    urls = [wheel["url"] for wheel in onnxruntime["wheels"]]
    assert any("aarch64" in url for url in urls) and any("x86_64" in url for url in urls)


def test_every_install_path_installs_from_the_lock_with_hashes() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "PIP_LOCKED = $(PY) -m pip install --quiet --require-hashes --no-deps" in makefile
    assert "$(PIP_LOCKED) -r requirements/dev.txt" in makefile
    assert "$(PIP_LOCKED) -r requirements/bench.txt" in makefile
    # The one unhashed install of the project's venv is the checkout itself, without its deps.
    installs = re.findall(r"\$\(PY\) -m pip install .*", makefile)
    assert installs == [
        "$(PY) -m pip install --quiet --require-hashes --no-deps --only-binary=:all:",
        "$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .",
    ]
    for route in ("build/debian-root.sh", "build/Dockerfile.arm64"):
        text = (REPO / route).read_text()
        assert "--require-hashes --no-deps --only-binary=:all:" in text, route
        assert "requirements/build.txt" in text, route
