"""The service's own endpoints, open to all: GET / (what this is), /health, /metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.http.callers import is_local_caller
from app.http.endpoint import endpoint
from app.http.errors import Dialect
from app.http.requests import MAX_INPUTS
from app.http.responses import JSONResponse
from app.serving.services import Services


@endpoint(Dialect.SMALLY)
async def index(request: Request) -> Response:
    services: Services = request.app.state.services
    return JSONResponse(
        {
            "name": "smally",
            "description": "Text embeddings API",
            "model": services.model.manifest.name,
            "endpoints": {
                "POST /v1/embed": "embed one text (Authorization: Bearer <key>)",
                "GET /health": "service health (build and stores: on its own machine only)",
                "POST /v1/embeddings": "OpenAI-compatible embeddings "
                f"(one text or up to {MAX_INPUTS})",
                "GET /v1/models": "the served model (OpenAI-compatible)",
                "GET /v1/usage": "your own usage of a month and your limits (?month=YYYY-MM)",
                "GET /metrics": "Prometheus metrics",
            },
        }
    )


@endpoint(Dialect.SMALLY)
async def health(request: Request) -> Response:
    services: Services = request.app.state.services
    status, body = await services.health()
    if not is_local_caller(request.scope):
        # The build and each store's state are for the operator on the machine; anyone else
        # (through nginx: everyone) learns whether the service can serve, and the same status.
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=status)


@endpoint(Dialect.SMALLY)
async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    return Response(services.metrics.render(), media_type=services.metrics.content_type)


def routes() -> list[Route]:
    return [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
