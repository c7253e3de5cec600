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

from app.http.embed import (
    authenticate,
    json_body,
    parse_truncate,
    quota_headers_on_error,
    refuse_known_over_quota,
    serve,
    services_of,
    tokenize,
)
from app.http.errors import InvalidRequest, ModelNotFound, TextTooLongError
from app.http.responses import JSONResponse
from app.model.engine import l2_normalize
from app.serving.services import Services

MAX_INPUTS = 2048
_STARTED = int(time.time())


async def embeddings(request: Request) -> Response:
    services = services_of(request)
    principal = await authenticate(services, request)
    refuse_known_over_quota(services, principal)
    async with quota_headers_on_error(services, principal):
        payload = await json_body(request, services)
        texts, encoding_format, dimensions, truncate = parse_request(payload, services)
        try:
            token_ids = await tokenize(services, texts, truncate=truncate)
        except TextTooLongError as exc:
            exc.extra["param"] = f"input[{exc.extra['index']}]" if len(texts) > 1 else "input"
            raise
        served = await serve(services, principal, token_ids, normalize=True)
    vectors = np.stack(served.vectors)
    if dimensions is not None:
        vectors = l2_normalize(vectors[:, :dimensions])
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    tokens = sum(len(row) for row in token_ids)  # embedded: after truncation, if any
    request.state.cached = all(served.cached)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": services.embeddings.manifest.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=served.quota.headers(),
    )


async def models(request: Request) -> Response:
    services = services_of(request)
    await authenticate(services, request)
    names = [services.embeddings.manifest.name, *services.settings.model_aliases]
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": _STARTED, "owned_by": "smally"}
                for name in names
            ],
        }
    )


def accepted_model_names(served_name: str, aliases: tuple[str, ...]) -> tuple[str, ...]:
    """What `model` may say: the served name, its sentence-transformers id, configured aliases."""
    return (served_name, f"sentence-transformers/{served_name}", *aliases)


def parse_request(payload: Any, services: Services) -> tuple[list[str], str, int | None, bool]:
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object", param=None)
    served_name = services.embeddings.manifest.name
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required (a string)", param="model")
    if model not in accepted_model_names(served_name, services.settings.model_aliases):
        shown = model if len(model) <= 64 else model[:64] + "..."  # never echo a megabyte
        raise ModelNotFound(
            f"the model {shown!r} is not served here; use {served_name!r}", param="model"
        )

    raw = payload.get("input")
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw:
        texts = raw
    else:
        raise InvalidRequest(
            "'input' must be a string or a non-empty array of strings", param="input"
        )
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"'input' has {len(texts)} items; at most {MAX_INPUTS}", param="input")
    for index, text in enumerate(texts):
        param = f"input[{index}]" if isinstance(raw, list) else "input"
        if not isinstance(text, str):
            # Token arrays (what OpenAI clients send after tiktoken) mean nothing to this model.
            raise InvalidRequest(
                f"{param} must be a string (token arrays are not accepted)", param=param
            )
        if not text.strip():
            raise InvalidRequest(f"{param} must not be empty or only whitespace", param=param)

    encoding_format = payload.get("encoding_format", "float")
    if encoding_format not in ("float", "base64"):
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
        )
    dimensions = payload.get("dimensions")
    if isinstance(dimensions, float) and dimensions.is_integer():
        dimensions = int(dimensions)  # JSON has one number type: 64.0 is the integer 64
    dimension = services.embeddings.manifest.dimension
    if dimensions is not None and (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 1 <= dimensions <= dimension
    ):
        raise InvalidRequest(
            f"'dimensions' must be an integer from 1 to {dimension}", param="dimensions"
        )
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", param="user")
    return texts, encoding_format, dimensions, parse_truncate(payload)


def _encode(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector
