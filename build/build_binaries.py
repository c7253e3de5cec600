"""Build the one-file `api` and `create_api_key` executables with PyInstaller (spec/*.spec).

The one build script of every route: the host's venv (`make build`), the Debian arm64 root under
qemu and the ARM64 Docker image (`make build ARCH=arm64`) all run it with a Python that has the
project's dependencies and PyInstaller. It writes the build info the binaries embed, builds both,
checks the highest glibc they need (build/glibc_check.py) and prints their sizes.

    python build/build_binaries.py --dist dist
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "build"))

from glibc_check import DEFAULT_CEILING, ceiling, version_key  # noqa: E402

from app import __version__  # noqa: E402

PROGRAMS = ("api", "create_api_key")


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def build_info() -> dict[str, object]:
    """Version, git hash, dirty flag and build time: from git, or from SMALLY_GIT_* variables
    (set by a route that builds where there is no git, such as a Docker context)."""
    git_hash = os.environ.get("SMALLY_GIT_HASH") or _git("rev-parse", "--short=12", "HEAD")
    dirty_env = os.environ.get("SMALLY_GIT_DIRTY")
    if dirty_env is not None:
        dirty: bool | None = dirty_env.lower() in ("1", "true") if dirty_env else None
    else:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    timestamp = os.environ.get("SMALLY_BUILD_TIMESTAMP") or datetime.now(UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    return {
        "version": __version__,
        "git_hash": git_hash,
        "git_dirty": dirty,
        "build_timestamp": timestamp,
    }


def human(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, default=REPO / "dist", help="output directory")
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / ".cache" / "pyinstaller" / platform.machine(),
        help="PyInstaller's work directory (kept for faster rebuilds)",
    )
    parser.add_argument(
        "--print-build-info",
        action="store_true",
        help="only print the build info as SMALLY_GIT_* shell assignments, for another route",
    )
    parser.add_argument("--max-glibc", default=DEFAULT_CEILING, help="highest glibc allowed")
    args = parser.parse_args()

    if args.print_build_info:
        info = build_info()
        dirty = {True: "true", False: "false", None: ""}[info["git_dirty"]]  # type: ignore[index]
        print(f"SMALLY_GIT_HASH={shlex.quote(str(info['git_hash'] or ''))}")
        print(f"SMALLY_GIT_DIRTY={dirty}")
        print(f"SMALLY_BUILD_TIMESTAMP={shlex.quote(str(info['build_timestamp']))}")
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    info_file = args.work / "_build_info.json"  # the bundled file must have this name
    info_file.write_text(json.dumps(build_info(), indent=2) + "\n")
    print(f"build info: {json.loads(info_file.read_text())}", flush=True)

    env = {**os.environ, "SMALLY_BUILD_INFO": str(info_file.resolve())}
    for program in PROGRAMS:
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "PyInstaller",
                "--noconfirm",
                "--log-level",
                "WARN",
                "--distpath",
                str(args.dist),
                "--workpath",
                str(args.work),
                str(REPO / "spec" / f"{program}.spec"),
            ],
            env=env,
            cwd=REPO,
            check=True,
        )
        print(f"built {args.dist / program} in {time.monotonic() - started:.0f} s", flush=True)
        # Imports the whole command line: a module the spec left out but the CLI needs fails here.
        shown = subprocess.run(
            [str(args.dist / program), "--version"], capture_output=True, text=True, check=False
        )
        if shown.returncode != 0:
            print(shown.stderr[-3000:], file=sys.stderr)
            (args.dist / program).unlink()
            print(f"{program} --version failed: the spec leaves out something it needs")
            return 1
        print(shown.stdout.strip(), flush=True)

    failed = False
    for program in PROGRAMS:
        path = args.dist / program
        highest, culprits = ceiling(path)
        ok = version_key(highest) <= version_key(args.max_glibc)
        print(
            f"{path}: {human(path.stat().st_size)}, needs glibc {highest} "
            f"(ceiling {args.max_glibc}: {'ok' if ok else 'TOO NEW, from ' + ', '.join(culprits)})"
        )
        if not ok:
            path.unlink()  # never leave a binary behind that the oldest target cannot run
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
