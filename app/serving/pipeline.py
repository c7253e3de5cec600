"""Embeddings for a customer: quota -> tokens -> cache -> model -> cache, and metering.

Both embedding endpoints call `embed` with the texts they have parsed; this is the one place that
decides what an embedding costs and where it comes from. The monthly quota is reserved on the
input count before any text is tokenized, so a customer out of quota costs no tokenizer work;
the tokens are charged to the per-minute limit as soon as they are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg_pool import PoolTimeout

from app.metrics import Metrics
from app.model.runner import EngineRunner
from app.serving.auth import Principal
from app.serving.cache import EmbeddingCache
from app.serving.errors import StoreUnavailable
from app.serving.quota import QuotaService, QuotaState
from app.serving.ratelimit import RateLimiter, RateState


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: list[np.ndarray]
    cached: list[bool]
    tokens: list[int]  # per input, as embedded (after truncation, if any)
    quota: QuotaState  # after this request
    rate: RateState  # the per-minute limits after this request

    def headers(self) -> dict[str, str]:
        return {**self.quota.headers(), **self.rate.headers()}


class EmbeddingPipeline:
    def __init__(
        self,
        model: EngineRunner,
        cache: EmbeddingCache,
        quota: QuotaService,
        limits: RateLimiter,
        metrics: Metrics,
    ) -> None:
        self.model = model
        self.cache = cache
        self.quota = quota
        self.limits = limits
        self.metrics = metrics

    async def embed(
        self, principal: Principal, texts: Sequence[str], *, truncate: bool, normalize: bool
    ) -> Embedded:
        """Embed every input or none: a batch that would cross the quota consumes nothing
        (raises QuotaExceeded), and a failure gives the reserved embeddings back."""
        try:
            reservation = await self.quota.reserve(principal, len(texts), 0)
        except (psycopg.OperationalError, PoolTimeout):
            raise StoreUnavailable("the database is unavailable; retry shortly") from None
        try:
            token_ids = await self.model.tokenize(texts, truncate=truncate)
            tokens = sum(len(row) for row in token_ids)
            rate = await self.limits.charge_tokens(principal, tokens)
            await self.quota.set_tokens(reservation, tokens)
            vectors, cached = await self._vectors(principal, token_ids, normalize)
        except BaseException:
            await self.quota.release(reservation)
            raise
        self.quota.commit(reservation)
        for row in token_ids:
            self.metrics.token_count.observe(len(row))
        return Embedded(vectors, cached, [len(row) for row in token_ids], reservation.state, rate)

    async def _vectors(
        self, principal: Principal, token_ids: Sequence[Sequence[int]], normalize: bool
    ) -> tuple[list[np.ndarray], list[bool]]:
        keys = [self.cache.key(row, normalize, principal.user_id) for row in token_ids]
        vectors: list[np.ndarray | None] = [None] * len(keys)
        for i, hit in enumerate(await self.cache.get_many(keys)):
            if hit is not None:
                vectors[i] = hit.vector
                self.metrics.cache_hits.labels(hit.level).inc()
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if missing:
            self.metrics.cache_misses.inc(len(missing))
            computed = await self.model.infer(
                [token_ids[i] for i in missing], normalize=normalize, owner=principal.user_id
            )
            for row, i in enumerate(missing):
                vectors[i] = computed[row]
            self.cache.store([(keys[i], computed[row]) for row, i in enumerate(missing)])
        cached = [True] * len(keys)
        for i in missing:
            cached[i] = False
        return [v for v in vectors if v is not None], cached
