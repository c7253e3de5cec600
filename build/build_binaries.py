"""Build the one-file `api` and `create_api_key` executables with PyInstaller (spec/*.spec).

The one build script of every route (build/build-frozen.sh): the Debian bookworm roots of each
architecture (`make build`, `make build ARCH=arm64`) and the ARM64 Docker image run it with
Debian's python3.11, in a venv that has the project's dependencies and PyInstaller, installed
from the lock (requirements/build.txt, checked here). It writes the build info the binaries
embed (with the interpreter frozen into them and the package it came from), builds both, checks
the highest glibc they need (build/glibc_check.py), prints their sizes and writes the stamp
BUILD.json beside them (build/stamp.py), which `make deploy` compares with the working tree.

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
import sysconfig
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "build"))

from glibc_check import DEFAULT_CEILING, ceiling, version_key  # noqa: E402
from lock import lock_sha256  # noqa: E402
from stamp import working_tree, write  # noqa: E402

from app import __version__  # noqa: E402
from app.buildinfo import release_name  # noqa: E402

PROGRAMS = ("api", "create_api_key")
LOCKED = REPO / "requirements" / "build.txt"
# The build info from the host, for a route that builds where there is no git (a Docker context,
# the arm64 root): build/build-arm64.sh passes --print-build-info's output on.
FROM_HOST = {
    "git_hash": "SMALLY_GIT_HASH",
    "git_dirty": "SMALLY_GIT_DIRTY",
    "git_diff_sha256": "SMALLY_GIT_DIFF_SHA256",
    "lock_sha256": "SMALLY_LOCK_SHA256",
    "build_timestamp": "SMALLY_BUILD_TIMESTAMP",
}
# Only in the stamp: /health and --version say dirty or not, the stamp also which changes.
STAMP_ONLY = ("git_diff_sha256",)


def build_info() -> dict[str, object]:
    """Version, git hash, dirty flag, lock hash and build time: from the checkout, or from the
    SMALLY_* variables of FROM_HOST when they are set."""
    info: dict[str, object] = {"version": __version__}
    if os.environ.get("SMALLY_GIT_HASH") is None:
        info.update(working_tree())
        info["build_timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return info
    for key, name in FROM_HOST.items():
        info[key] = os.environ.get(name) or None
    dirty = info["git_dirty"]
    info["git_dirty"] = None if dirty is None else str(dirty).lower() in ("1", "true")
    info["lock_sha256"] = info["lock_sha256"] or lock_sha256()  # the Docker context has uv.lock
    info["build_timestamp"] = info["build_timestamp"] or datetime.now(UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    return info


def interpreter() -> dict[str, str | None]:
    """The Python being frozen: its sys.version (which names its build), and the package its
    shared library, the one PyInstaller bundles, comes from (`libpython3.11 3.11.2-6+deb12u9` in
    the Debian roots; None for an interpreter dpkg did not install)."""
    library = Path(sysconfig.get_config_var("LIBDIR") or "/") / (
        sysconfig.get_config_var("INSTSONAME") or "libpython.so"
    )
    package = None
    try:
        owner = subprocess.run(
            ["dpkg-query", "--search", str(library.resolve())],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        name = owner.split(":")[0]  # libpython3.11:amd64: /usr/lib/x86_64-linux-gnu/...
        version = subprocess.run(
            ["dpkg-query", "--show", "--showformat=${Version}", name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        package = f"{name} {version}"
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"python": sys.version, "python_package": package}


def unlocked_packages(requirements: Path = LOCKED) -> list[str]:
    """The packages of requirements/build.txt that this Python does not have at the locked
    version: a frozen binary is built from the lock or not at all."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.markers import Marker

    wrong = []
    for line in requirements.read_text().splitlines():
        if not line or line[0] in "# ":  # comments, and the --hash and `# via` lines
            continue
        requirement, _, marker = line.rstrip(" \\").partition(";")
        name, _, pinned = requirement.strip().partition("==")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            wrong.append(f"{name} {installed} (locked: {pinned})")
    return wrong


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

    info = build_info()
    if args.print_build_info:
        for key, name in FROM_HOST.items():
            value = {True: "true", False: "false", None: ""}.get(info[key], info[key])  # type: ignore[call-overload]
            print(f"{name}={shlex.quote(str(value))}")
        return 0

    wrong = unlocked_packages()
    if wrong:
        print(
            f"{sys.executable} does not have the locked packages of {LOCKED.relative_to(REPO)}: "
            + ", ".join(wrong)
            + " (`make install` installs them)",
            file=sys.stderr,
        )
        return 1
    info.update(interpreter())
    print(f"freezing Python {info['python']} ({info['python_package'] or 'no package'})")
    args.work.mkdir(parents=True, exist_ok=True)
    info_file = args.work / "_build_info.json"  # the bundled file must have this name
    bundled = {key: value for key, value in info.items() if key not in STAMP_ONLY}
    info_file.write_text(json.dumps(bundled, indent=2) + "\n")
    print(f"build info: {bundled}", flush=True)
    (args.dist / "BUILD.json").unlink(missing_ok=True)  # no stamp until the binaries are good

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
    if failed:
        return 1
    # The release name (the directory on the server) from the very function the binary uses.
    info["release"] = release_name(info)
    print(f"stamp: {write(args.dist, info, platform.machine())} (release {info['release']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
