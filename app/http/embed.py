"""POST /v1/embed: one text in, its embedding out (Smally's own dialect)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.http.endpoint import authenticate, endpoint, json_body, ready_services
from app.http.errors import Dialect
from app.http.requests import RequestBodies
from app.http.responses import JSONResponse


@endpoint(Dialect.SMALLY)
async def embed(request: Request) -> Response:
    started = time.perf_counter()
    services = ready_services(request)
    principal = await authenticate(services, request)
    # Before reading the body: a user just seen out of quota costs no parsing or tokenizing.
    services.quota.refuse_if_known_exhausted(principal)
    bodies: RequestBodies = request.app.state.bodies
    fields = bodies.embed.parse(await json_body(request, services))
    embedded = await services.pipeline.embed(
        principal, [fields["text"]], truncate=fields["truncate"], normalize=fields["normalize"]
    )
    request.state.cached = embedded.cached[0]
    return JSONResponse(
        {
            "embedding": embedded.vectors[0],
            "model": services.model.manifest.name,
            "tokens": embedded.tokens[0],  # what was embedded: after truncation, if any
            "cached": embedded.cached[0],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
        headers=embedded.headers(),
    )


def routes() -> list[Route]:
    return [Route("/v1/embed", embed, methods=["POST"])]
