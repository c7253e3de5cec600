"""The stamp of a build, BUILD.json beside its binaries, and the check that `make deploy` makes.

build/build_binaries.py writes the stamp (every route: host, Docker, the arm64 root): the commit,
whether the tree was dirty (and a hash of its uncommitted changes), the sha256 of uv.lock, the
architecture. `make deploy` refuses a dist/ whose stamp does not match the working tree, so
that what is deployed is what the tree says:

    python build/stamp.py check dist [dist/arm64 ...]   exit 1, saying why, when one is stale

Each directory holding an `api` is checked (and must have a stamp); ALLOW_STALE_DIST=1 turns
the refusal into a warning, for the deliberate case. Stdlib only: it runs before any venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "build"))

from lock import lock_sha256  # noqa: E402

STAMP = "BUILD.json"
# What must match between a stamp and the working tree, and how to say it.
COMPARED = {
    "git_hash": "commit",
    "git_dirty": "uncommitted changes",
    "git_diff_sha256": "uncommitted changes (their content)",
    "lock_sha256": "uv.lock",
}


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def working_tree() -> dict[str, object]:
    """The commit, dirty flag, hash of the uncommitted changes to tracked files (None when
    clean) and lock hash of the checkout; git's answers are None where there is no git."""
    git_hash = _git("rev-parse", "--short=12", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status)
    diff = _git("diff", "HEAD", "--binary") if dirty else None
    return {
        "git_hash": git_hash,
        "git_dirty": dirty,
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "lock_sha256": lock_sha256(),
    }


def write(dist: Path, info: dict[str, object], arch: str) -> Path:
    path = dist / STAMP
    stamp = {key: info.get(key) for key in COMPARED}
    stamp.update(
        arch=arch,
        version=info.get("version"),
        build_timestamp=info.get("build_timestamp"),
        # The directory ansible/site.yml uploads the build into: releases/<release>/.
        release=info.get("release"),
        # The interpreter frozen into the binaries, and the package that shipped it.
        python=info.get("python"),
        python_package=info.get("python_package"),
    )
    path.write_text(json.dumps(stamp, indent=2) + "\n")
    return path


def problems(dist: Path, tree: dict[str, object]) -> list[str]:
    """Why the build in DIST is not the working tree's (empty: it is, or there is no build)."""
    if not (dist / "api").is_file():
        return []  # nothing built there: the playbook says what to build if a server needs it
    path = dist / STAMP
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return [f"{dist}: no readable {STAMP}, the build is of unknown origin"]
    return [
        f"{dist}: built from {what} {stamp.get(key)!r}, the working tree has {tree[key]!r}"
        for key, what in COMPARED.items()
        if stamp.get(key) != tree[key]
    ]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "check":
        print(__doc__, file=sys.stderr)
        return 2
    tree = working_tree()
    found = [line for dist in argv[1:] for line in problems(Path(dist), tree)]
    if not found:
        for dist in argv[1:]:
            if (Path(dist) / STAMP).is_file():
                print(f"{dist}: built from this working tree ({Path(dist) / STAMP})")
        return 0
    allowed = os.environ.get("ALLOW_STALE_DIST", "") not in ("", "0")
    print(
        f"{'WARNING' if allowed else 'refusing to deploy'}: a stale build would be deployed",
        *(f"  {line}" for line in found),
        "Run `make build` (and `make build ARCH=arm64` for aarch64 servers), or remove the stale"
        " directory. To deploy it anyway: make deploy ALLOW_STALE_DIST=1",
        sep="\n",
        file=sys.stderr,
    )
    return 0 if allowed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
