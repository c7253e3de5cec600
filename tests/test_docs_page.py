"""GET /docs: the API reference page, served by the app itself and rendered by a real browser
(Debian's headless Chromium driven by playwright-core, tests/browser/), with no internet."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.docs import ASSETS_DIR, MEDIA_TYPES
from tests.helpers import REPO, ApiProcess

BROWSER_DIR = REPO / "tests" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / ".artifacts" / "docs.png"
ASSETS = REPO / "app" / ASSETS_DIR


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    # `make test` builds both (make install, make browser-tools); say so rather than skip.
    if not (ASSETS / "swagger-ui-bundle.js").is_file():
        pytest.fail(f"{ASSETS} is not built: run `make docs-assets`")
    if not CHROMIUM.exists() or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("the browser tools are missing: run `make browser-tools`")


def open_in_chromium(url: str, screenshot: Path, profile: Path) -> dict:
    """What Chromium saw at `url` (tests/browser/docs_page.mjs), its screenshot in `screenshot`."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    result = subprocess.run(
        ["node", "docs_page.mjs", url, str(screenshot), str(profile)],
        cwd=BROWSER_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout)


def test_docs_page_renders_in_chromium_with_no_failed_request(
    api: ApiProcess, tmp_path: Path
) -> None:
    report = open_in_chromium(f"{api.base_url}/docs", SCREENSHOT, tmp_path / "chromium-profile")
    print(f"\nscreenshot: {SCREENSHOT} ({SCREENSHOT.stat().st_size} bytes)")
    assert report["failed"] == []
    assert report["bad_responses"] == []
    assert report["console_errors"] == []
    assert report["page_errors"] == []
    assert report["external"] == []  # nothing from the internet: it would fail here anyway
    origin = api.base_url
    fetched = set(report["requests"])
    for needed in ("/docs", "/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js", "/openapi.json"):
        assert f"{origin}{needed}" in fetched, (needed, sorted(fetched))
    for url, seen in report["responses"].items():
        assert seen["nosniff"] == "nosniff", url  # and yet everything loaded: the types are right
    assert report["rendered"], report["text"][:2000]
    assert "/v1/embed" in report["paths"] and "/v1/embeddings" in report["paths"], report["paths"]
    assert "/v1/embed" in report["text"] and "/v1/embeddings" in report["text"]
    assert report["title"] == "Smally API reference"
    assert SCREENSHOT.stat().st_size > 10_000  # a rendered page, not a blank one


def test_docs_assets_have_their_types(api: ApiProcess) -> None:
    with httpx.Client(base_url=api.base_url, timeout=30) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/docs/swagger-ui-bundle.js">' in page.text
        for name, media_type in (
            ("swagger-ui-bundle.js", MEDIA_TYPES[".js"]),
            ("swagger-ui.css", MEDIA_TYPES[".css"]),
            ("favicon-32x32.png", MEDIA_TYPES[".png"]),
            ("LICENSE.txt", MEDIA_TYPES[".txt"]),
        ):
            response = client.get(f"/docs/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"] == media_type, name
            assert response.content == (ASSETS / name).read_bytes(), name
        init = client.get("/docs/init.js")
        assert init.status_code == 200 and init.headers["content-type"] == MEDIA_TYPES[".js"]
        assert '"/openapi.json"' in init.text and "validatorUrl: null" in init.text
        assert client.head("/docs/swagger-ui.css").status_code == 200

        for name in ("nope.js", "manifest.json", "swagger-ui.css.map", "", "sub/swagger-ui.css"):
            response = client.get(f"/docs/{name}")
            assert response.status_code == 404, name
            assert response.json()["error"] == "not_found", name


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written: no client normalises its dots or its escapes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/docs/../server.py",
        "/docs/..%2fserver.py",
        "/docs/%2e%2e/%2e%2e/pyproject.toml",
        "/docs/..%2F..%2Fpyproject.toml",
        "/docs//etc/passwd",
        "/docs/%2fetc%2fpasswd",
        "/docs/.%2e/docs.py",
        "/docs/swagger-ui.css%00.png",
        "/docs/./manifest.json",
    ],
)
def test_docs_assets_never_leave_their_directory(api: ApiProcess, target: str) -> None:
    status, body = raw_get(api.port, target)
    assert status in (400, 404), (target, status, body[:300])
    assert json.loads(body)["error"] in ("not_found", "invalid_request"), body[:300]
    assert b"import" not in body and b"root:" not in body and b"[project]" not in body


@pytest.fixture
def api_without_assets(module_env: dict[str, str], tmp_path: Path) -> Iterator[ApiProcess]:
    """The real `api`, run from a copy of the source tree in which the assets were never built
    (PYTHONPATH puts it ahead of the editable install)."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO / "app", source / "app", ignore=shutil.ignore_patterns(ASSETS_DIR, "__pycache__")
    )
    env = {**module_env, "PYTHONPATH": str(source)}
    process = ApiProcess(env, tmp_path).start()
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def test_docs_without_built_assets_is_a_json_error(api_without_assets: ApiProcess) -> None:
    with httpx.Client(base_url=api_without_assets.base_url, timeout=30) as client:
        for path in ("/docs", "/docs/swagger-ui-bundle.js", "/docs/init.js"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.headers["content-type"] == "application/json"
            body = response.json()
            assert body["error"] == "not_found"
            assert "make docs-assets" in body["message"]
        # The rest of the service does not mind.
        assert client.get("/health").json()["status"] == "healthy"
    records = api_without_assets.log_records()
    assert not [r for r in records if r.get("level") in ("error", "critical")], records[-5:]
