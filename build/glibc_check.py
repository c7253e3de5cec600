"""The highest GLIBC_ symbol version a one-file executable needs: its bootloader and every ELF
file bundled inside it, read with `objdump -T` (`readelf` when objdump cannot read that
architecture, as the host's objdump cannot read aarch64).

    python build/glibc_check.py dist/api dist/create_api_key --max 2.35
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GLIBC = re.compile(r"GLIBC_(\d+(?:\.\d+)+)")

# What the frozen binaries claim to run on: Ubuntu 22.04 (glibc 2.35) and newer, Debian 12.
DEFAULT_CEILING = "2.35"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def glibc_versions(path: Path) -> set[str]:
    """GLIBC_ versions the ELF file at `path` needs from its dynamic symbol table."""
    result = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        # e.g. "file format not recognized" for another architecture: readelf reads any ELF.
        result = subprocess.run(
            ["readelf", "-W", "--dyn-syms", "--version-info", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
    return set(GLIBC.findall(result.stdout))


def bundled_elf_files(executable: Path, into: Path) -> list[Path]:
    """Extract the ELF files of a one-file executable's archive into `into`."""
    from PyInstaller.archive.readers import CArchiveReader

    reader = CArchiveReader(str(executable))
    files = []
    for name in reader.toc:
        data = reader.extract(name)
        if not isinstance(data, bytes) or not data.startswith(b"\x7fELF"):
            continue
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files.append(target)
    return files


def ceiling(executable: Path) -> tuple[str, list[str]]:
    """(highest GLIBC_ version needed, the files that need it) for a one-file executable."""
    needs: dict[str, set[str]] = {}
    needs[executable.name] = glibc_versions(executable)
    with tempfile.TemporaryDirectory() as tmp:
        for path in bundled_elf_files(executable, Path(tmp)):
            needs[str(path.relative_to(tmp))] = glibc_versions(path)
    highest = max((v for vs in needs.values() for v in vs), key=version_key, default="0")
    return highest, sorted(name for name, vs in needs.items() if highest in vs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("executables", nargs="+", type=Path)
    parser.add_argument("--max", default=DEFAULT_CEILING, help="highest glibc allowed")
    args = parser.parse_args()
    if shutil.which("objdump") is None:
        print("objdump is missing (apt-get install binutils)", file=sys.stderr)
        return 2
    failed = False
    for executable in args.executables:
        highest, culprits = ceiling(executable)
        ok = version_key(highest) <= version_key(args.max)
        failed |= not ok
        print(
            f"{executable}: needs GLIBC_{highest} (allowed: {args.max}) "
            f"{'ok' if ok else 'TOO NEW'} - from {', '.join(culprits[:5])}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
