"""GET /v1/usage: the caller's own usage of a month (`?month=YYYY-MM`, default the current one),
beside the limits of its tier. Only the key's own user: nothing here names another customer."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.http.endpoint import authenticate, endpoint, ready_services
from app.http.errors import Dialect, InvalidRequest
from app.http.responses import JSONResponse
from app.serving.quota import UNLIMITED, limit_or_none
from app.serving.statement import Statement

MONTH = re.compile(r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$")


@endpoint(Dialect.SMALLY)
async def usage(request: Request) -> Response:
    services = ready_services(request)
    principal = await authenticate(services, request)
    statement = await services.statements.of(principal, parse_month(request.query_params))
    return JSONResponse(render(statement))


def parse_month(query: QueryParams) -> datetime | None:
    unknown = sorted(set(query.keys()) - {"month"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter {unknown[0]!r}", param=unknown[0])
    values = query.getlist("month")
    if not values:
        return None
    if len(values) > 1 or not MONTH.match(values[0]):
        raise InvalidRequest("month must be one YYYY-MM, such as 2026-11", param="month")
    year, month = values[0].split("-")
    return datetime(int(year), int(month), 1, tzinfo=UTC)


def render(statement: Statement) -> dict[str, Any]:
    requests, tokens = statement.per_minute
    return {
        "object": "usage",
        "month": f"{statement.month.year:04d}-{statement.month.month:02d}",
        "tier": statement.tier,
        "embeddings": statement.embeddings,
        "tokens": statement.tokens,
        "limit": limit_or_none(statement.limit),
        "remaining": None if statement.limit == UNLIMITED else statement.remaining,
        "resets_at": (
            None if statement.resets_at is None else f"{statement.resets_at:%Y-%m-%dT%H:%M:%SZ}"
        ),
        "per_minute": {"requests": limit_or_none(requests), "tokens": limit_or_none(tokens)},
    }


def routes() -> list[Route]:
    return [Route("/v1/usage", usage, methods=["GET"])]
