"""JSON responses rendered with orjson (fast, and numpy vectors serialise without copies)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from app.http.errors import ApiError

# Endpoints that speak OpenAI's dialect, errors included.
OPENAI_PATHS = ("/v1/embeddings", "/v1/models")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(error: ApiError, path: str) -> JSONResponse:
    """The error in the envelope of the endpoint at `path`: OpenAI's on its endpoints."""
    body = error.openai_body() if path.startswith(OPENAI_PATHS) else error.body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)
