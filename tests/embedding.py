"""Tokenize and infer in one call, as the tests of the engine want it (the service never does:
it tokenizes in the request and infers through the batching queue)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.model.engine import Engine


@dataclass(frozen=True, slots=True)
class Embedded:
    vectors: np.ndarray  # float32 [n, dimension]
    token_counts: list[int]


def embed(engine: Engine, texts: Sequence[str], *, normalize: bool = True) -> Embedded:
    """Raises TextTooLong before any inference, as the service does."""
    token_ids = engine.tokenize(texts)
    vectors = engine.infer(token_ids, normalize=normalize)
    return Embedded(vectors=vectors, token_counts=[len(row) for row in token_ids])
