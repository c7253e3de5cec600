"""Print what a frozen build installs: the service's dependencies (pyproject.toml) and
PyInstaller, one requirement a line. Used by the arm64 routes, which have no venv of ours."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    dev = project["optional-dependencies"]["dev"]
    return [*project["dependencies"], *(r for r in dev if r.lower().startswith("pyinstaller"))]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{r}\n" for r in requirements()))
