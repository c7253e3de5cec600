"""GET /docs: the API reference page (Swagger UI rendering /openapi.json), served by the app.

Swagger UI's files come from the npm registry at build time (build/docs-assets/build.sh, run by
`make docs-assets` and every target that installs) into app/docs_assets/; the frozen `api`
carries them in its bundle. The page loads nothing from anywhere else, so it works offline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from app.http.endpoint import endpoint
from app.http.errors import Dialect, NotFound

ASSETS_DIR = "docs_assets"
# Its presence tells a built directory from a missing one (build.sh renames a finished one in).
_BUNDLE = "swagger-ui-bundle.js"
_INIT = "init.js"

# Explicit types, not the machine's mime.types: the middleware sends `nosniff`, so a script
# or stylesheet served under any other type is refused by the browser.
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}

# Everything the page needs is on this origin: the scripts and styles are files (no inline
# script), the stylesheet's icons are data: URIs, the spec is fetched from /openapi.json.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Smally API reference</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/{_BUNDLE}"></script>
<script src="/docs/{_INIT}"></script>
</body>
</html>
"""

# validatorUrl: null, or Swagger UI sends the spec to a public validator and shows its badge.
_INIT_SCRIPT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"""


def assets_directory() -> Path:
    # A frozen binary carries the files in its bundle (spec/smally_spec.py); never read the
    # source tree there.
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        return Path(bundle) / "app" / ASSETS_DIR
    return Path(__file__).resolve().parents[1] / ASSETS_DIR


@dataclass(frozen=True, slots=True)
class DocsPage:
    directory: Path

    def _require_built(self) -> None:
        if not (self.directory / _BUNDLE).is_file():
            raise NotFound(
                "the API reference page is not built into this install: run `make docs-assets` "
                "(or any make target that installs); the spec itself is at /openapi.json"
            )

    async def page(self, request: Request) -> Response:
        self._require_built()
        return HTMLResponse(_PAGE, headers={"Content-Security-Policy": _CSP})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["asset"]
        self._require_built()
        if name == _INIT:
            return Response(_INIT_SCRIPT, media_type=MEDIA_TYPES[".js"])
        # Only a file that is there by that exact name: no path ever reaches the filesystem,
        # so `..`, slashes and encoded tricks simply match nothing.
        served = {p.name for p in self.directory.iterdir() if p.suffix in MEDIA_TYPES}
        if name not in served:
            raise NotFound(f"no such file in the API reference page: {name[:100]!r}")
        path = self.directory / name
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])


def routes(directory: Path | None = None) -> list[Route]:
    docs = DocsPage(directory if directory is not None else assets_directory())
    return [
        Route("/docs", endpoint(Dialect.SMALLY)(docs.page), methods=["GET"]),
        Route("/docs/{asset:path}", endpoint(Dialect.SMALLY)(docs.asset), methods=["GET"]),
    ]
