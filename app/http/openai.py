"""OpenAI-compatible endpoints: POST /v1/embeddings and GET /v1/models.

Same keys, quotas, cache and ledger as /v1/embed; requests and errors in OpenAI's shapes, so the
official clients (openai, LangChain, LlamaIndex) work by pointing `base_url` here.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.http.endpoint import authenticate, endpoint, json_body, ready_services
from app.http.errors import Dialect
from app.http.requests import RequestBodies, Served
from app.http.responses import JSONResponse
from app.model.engine import l2_normalize

# The `created` of /v1/models: when this process started.
_STARTED = int(time.time())


@endpoint(Dialect.OPENAI)
async def embeddings(request: Request) -> Response:
    services = ready_services(request)
    principal = await authenticate(services, request)
    services.quota.refuse_if_known_exhausted(principal)
    bodies: RequestBodies = request.app.state.bodies
    fields = bodies.embeddings.parse(await json_body(request, services))
    embedded = await services.pipeline.embed(
        principal, fields["input"], truncate=fields["truncate"], normalize=True
    )
    vectors = np.stack(embedded.vectors)
    if fields["dimensions"] is not None:
        vectors = l2_normalize(vectors[:, : fields["dimensions"]])
    encoding = fields["encoding_format"]
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
        for i, vector in enumerate(vectors)
    ]
    tokens = sum(embedded.tokens)  # embedded: after truncation, if any
    request.state.cached = all(embedded.cached)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": services.model.manifest.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=embedded.headers(),
    )


@endpoint(Dialect.OPENAI)
async def models(request: Request) -> Response:
    services = ready_services(request)
    await authenticate(services, request)
    served: Served = request.app.state.served  # built once, in the lifespan
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": _STARTED, "owned_by": "smally"}
                for name in (served.model, *served.aliases)
            ],
        }
    )


def _encode(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


def routes() -> list[Route]:
    return [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
