"""What this build is: version, git commit, dirty flag, the lock it was built from, build time.

A frozen binary carries `_build_info.json` written by the build script; a source checkout asks git
and hashes its uv.lock (from which `make install` installed the venv).
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from app import __version__


@functools.cache
def build_info() -> dict[str, Any]:
    bundled = Path(getattr(sys, "_MEIPASS", "")) / "_build_info.json"
    if getattr(sys, "frozen", False) and bundled.is_file():
        info = json.loads(bundled.read_text())
    else:
        info = {"git_hash": _git("rev-parse", "--short=12", "HEAD"), "build_timestamp": None}
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = None if status is None else bool(status)
        lock = Path(__file__).resolve().parent.parent / "uv.lock"
        info["lock_sha256"] = (
            hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
        )
    info["version"] = __version__
    # The interpreter running: in a binary, the one frozen into it (python_package names the
    # package it came from, written by the build; none for a source checkout).
    info["python"] = sys.version
    info.setdefault("python_package", None)
    info["release"] = release_name(info)
    return info


def release_name(info: dict[str, Any]) -> str:
    """The release a build is deployed as, and the name of its directory on the server
    (`releases/<name>/`): `<version>-<git hash>[-dirty][-<build time>]`. The build time tells
    two builds of the same commit apart, so that a rebuild is a new release; a source checkout
    has none. build/build_binaries.py writes it into BUILD.json with this same function, and
    /health and --version show it from the build info embedded in the binary."""
    parts = [str(info.get("version") or __version__), str(info.get("git_hash") or "unknown")]
    if info.get("git_dirty"):
        parts.append("dirty")
    built = info.get("build_timestamp")
    if built:
        # 2026-12-02T16:15:00Z -> 20261202T161500Z: letters and digits only, sorts by time.
        parts.append("".join(ch for ch in str(built) if ch.isalnum()))
    return "-".join(parts)


def version_line(program: str) -> str:
    info = build_info()
    dirty = "-dirty" if info.get("git_dirty") else ""
    built = info.get("build_timestamp") or "source"
    lock = (info.get("lock_sha256") or "unknown")[:12]
    git = info.get("git_hash") or "unknown"
    release = info["release"]
    return (
        f"{program} {info['version']} (git {git}{dirty}, {built}, lock {lock}, release {release})"
    )


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()
