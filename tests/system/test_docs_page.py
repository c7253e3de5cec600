"""GET /docs: the API reference page, served by the app itself and rendered by a real browser
(Debian's headless Chromium driven by playwright-core, tests/browser/), with no internet. And the
API called from a page on another origin in the same browser (CORS_ORIGINS)."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from app.http.docs import ASSETS_DIR, MEDIA_TYPES
from tests.helpers import REPO, ApiProcess, create_key

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


def run_browser_script(script: str, *args: str) -> dict:
    """Run tests/browser/`script` under node; it prints its report as one JSON object."""
    result = subprocess.run(
        ["node", script, *args], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout)


def open_in_chromium(url: str, screenshot: Path, profile: Path) -> dict:
    """What Chromium saw at `url` (tests/browser/docs_page.mjs), its screenshot in `screenshot`."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    return run_browser_script("docs_page.mjs", url, str(screenshot), str(profile))


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


# --- A browser client on another origin (CORS_ORIGINS) ---------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A static page served from its own port: another origin than any `api`."""
    root = tmp_path_factory.mktemp("page")
    (root / "index.html").write_text(
        '<!doctype html><link rel="icon" href="data:,"><title>a browser client</title>\n'
    )
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def call_from_page(page_origin: str, profile: Path, calls: list[dict]) -> dict:
    """What fetch() on a page of `page_origin` got for each call (browser/cross_origin.mjs)."""
    return run_browser_script(
        "cross_origin.mjs", f"{page_origin}/index.html", str(profile), json.dumps(calls)
    )


def test_a_page_on_another_origin_calls_the_api_only_when_allowed(
    api: ApiProcess, module_env: dict[str, str], page_origin: str, tmp_path: Path
) -> None:
    allowing = ApiProcess({**module_env, "CORS_ORIGINS": page_origin}, tmp_path).start()
    try:
        allowing.wait_healthy()
        key = create_key(allowing.env, tmp_path, "browser@example.com", "pro")
        body = {"text": "called from another origin"}
        report = call_from_page(
            page_origin,
            tmp_path / "chromium-profile",
            [
                {
                    "name": "allowed",
                    "url": f"{allowing.base_url}/v1/embed",
                    "key": key,
                    "body": body,
                },
                {
                    "name": "no key",
                    "url": f"{allowing.base_url}/v1/embed",
                    "key": None,
                    "body": body,
                },
                {
                    "name": "openai",
                    "url": f"{allowing.base_url}/v1/embeddings",
                    "key": key,
                    "body": {"model": "all-MiniLM-L6-v2", "input": ["a", "b"]},
                },
                # The module's service, without CORS_ORIGINS: the browser refuses the answer.
                {
                    "name": "not allowed",
                    "url": f"{api.base_url}/v1/embed",
                    "key": key,
                    "body": body,
                },
            ],
        )
        records = allowing.log_records()
    finally:
        assert allowing.stop() == 0
    seen = {name: o.get("status", o.get("error")) for name, o in report["outcomes"].items()}
    print(f"\nfetch() from {page_origin}: {seen}")
    assert report["origin"] == page_origin
    outcomes = report["outcomes"]
    allowed = outcomes["allowed"]
    assert allowed.get("ok") is True, allowed
    assert len(allowed["body"]["embedding"]) == 384 and allowed["body"]["tokens"] > 2
    assert allowed["remaining"] is not None  # exposed to the page (Access-Control-Expose-Headers)
    assert outcomes["openai"].get("ok") is True and len(outcomes["openai"]["body"]["data"]) == 2
    # An error's JSON reaches the page too, not a bare network error.
    assert outcomes["no key"].get("status") == 401, outcomes["no key"]
    assert outcomes["no key"]["body"]["error"] == "invalid_api_key"
    not_allowed = outcomes["not allowed"]
    assert "ok" not in not_allowed and not_allowed["error"].startswith("TypeError"), not_allowed
    preflights = [r for r in records if r.get("method") == "OPTIONS"]
    assert preflights and all(r["status"] == 204 for r in preflights), preflights
