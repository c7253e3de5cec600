"""Two-level embedding cache: an in-process LRU (L1) in front of Redis (L2).

The key is a hash of everything that changes the answer: the model file's sha256, the normalize
flag, and the token ids (not the text: texts that tokenize identically for this uncased model
share an entry, texts that differ never collide; a text cut by `truncate` is keyed by the ids
actually embedded, which give the same vector whoever sent them). A swapped model has another
sha256, so it can never be served a vector of the old one. L2 values are raw little-endian
float32 bytes.
With CACHE_SCOPE=user (the default) the key also holds the customer's user id: a hit then only
ever comes from that customer's own earlier request, so neither `"cached": true` nor a fast
answer tells one customer what another has embedded.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from app.serving.redis_link import RedisLink


@dataclass(frozen=True, slots=True)
class CacheHit:
    vector: np.ndarray
    level: str  # "l1" or "l2"


class EmbeddingCache:
    def __init__(
        self,
        link: RedisLink,
        *,
        model_sha256: str,
        dimension: int,
        l1_size: int,
        l2_ttl: int,
        per_user: bool = True,
    ) -> None:
        self.link = link
        self.model_sha256 = bytes.fromhex(model_sha256)
        self.dimension = dimension
        self.l1_size = l1_size
        self.l2_ttl = l2_ttl
        self.per_user = per_user
        self._l1: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def key(self, token_ids: Sequence[int], normalize: bool, user_id: int) -> bytes:
        digest = hashlib.blake2b(self.model_sha256, digest_size=20)
        digest.update(b"\x01" if normalize else b"\x00")
        if self.per_user:
            digest.update(user_id.to_bytes(8, "little", signed=True))
        digest.update(np.asarray(token_ids, dtype="<i4").tobytes())
        return digest.digest()

    async def get(self, key: bytes) -> CacheHit | None:
        (hit,) = await self.get_many([key])
        return hit

    async def put(self, key: bytes, vector: np.ndarray) -> None:
        await self.put_many([(key, vector)])

    async def get_many(self, keys: Sequence[bytes]) -> list[CacheHit | None]:
        """Each key's hit or None; what L1 lacks is asked of L2 in one round trip (MGET), so a
        batch of 2,048 inputs costs one, not 2,048."""
        hits: list[CacheHit | None] = [None] * len(keys)
        absent: list[int] = []
        for i, key in enumerate(keys):
            vector = self._l1.get(key)
            if vector is None:
                absent.append(i)
            else:
                self._l1.move_to_end(key)
                hits[i] = CacheHit(vector, "l1")
        if not absent or self.l2_ttl <= 0 or not self.link.available:
            return hits
        try:
            values = await self.link.client.mget([self._l2_key(keys[i]) for i in absent])
        except (aioredis.RedisError, OSError) as exc:
            self.link.failed(exc)
            return hits
        for i, raw in zip(absent, values, strict=True):
            if raw is None or len(raw) != 4 * self.dimension:
                continue
            vector = np.frombuffer(raw, dtype="<f4")
            self._remember(keys[i], vector)
            hits[i] = CacheHit(vector, "l2")
        return hits

    async def put_many(self, entries: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Store each (key, vector) in L1 and, in one round trip (a pipeline), in L2."""
        stored: list[tuple[bytes, np.ndarray]] = []
        for key, vector in entries:
            # A copy, never a view: a row of a batch would keep the whole batch (up to 2,048 x
            # 384 floats, 3 MB) alive as long as the entry lives, unbounding L1_CACHE_SIZE.
            copy = np.array(vector, dtype="<f4", copy=True)
            copy.setflags(write=False)
            self._remember(key, copy)
            stored.append((key, copy))
        if not stored or self.l2_ttl <= 0 or not self.link.available:
            return
        try:
            async with self.link.client.pipeline(transaction=False) as pipe:
                for key, vector in stored:
                    pipe.set(self._l2_key(key), vector.tobytes(), ex=self.l2_ttl)
                await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            self.link.failed(exc)

    def _remember(self, key: bytes, vector: np.ndarray) -> None:
        if self.l1_size <= 0:
            return
        self._l1[key] = vector
        self._l1.move_to_end(key)
        if len(self._l1) > self.l1_size:
            self._l1.popitem(last=False)

    def _l2_key(self, key: bytes) -> str:
        return self.link.key("emb", key.hex())
