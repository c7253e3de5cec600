"""Two-level embedding cache: an in-process LRU (L1) in front of Redis (L2).

The key is a hash of everything that changes the answer: the model file's sha256, the normalize
flag, and the token ids (not the text: texts that tokenize identically for this uncased model
share an entry, texts that differ never collide; a text cut by `truncate` is keyed by the ids
actually embedded, which give the same vector whoever sent them). A swapped model has another
sha256, so it can never be served a vector of the old one. L2 values are raw little-endian
float32 bytes.
L2 round trips are shared: lookups that arrive while one MGET is in flight go out together in
the next, and stores are written in the background, many per pipeline, after the answer has
gone (a lost store costs a future miss, never a wrong vector or a slower answer).
With CACHE_SCOPE=user (the default) the key also holds the customer's user id (after a byte
naming the scope, so that no user's key equals a shared one): a hit then only ever comes from
that customer's own earlier request, so neither `"cached": true` nor a fast answer tells one
customer what another has embedded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from app.serving.redis_link import RedisLink

# Stores waiting for the background writer, at most: past it (Redis slower than the traffic)
# new ones are not written to L2 (they are in L1), instead of growing without bound.
MAX_PENDING_STORES = 8192


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
        self._lookups: list[tuple[list[str], asyncio.Future[list[bytes | None]]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._stores: list[tuple[str, bytes]] = []
        self._writer: asyncio.Task[None] | None = None

    def key(self, token_ids: Sequence[int], normalize: bool, user_id: int) -> bytes:
        digest = hashlib.blake2b(self.model_sha256, digest_size=20)
        digest.update(b"\x01" if normalize else b"\x00")
        # The scope's byte first: a user id's bytes can never read as token ids of a shared key.
        if self.per_user:
            digest.update(b"u" + user_id.to_bytes(8, "little", signed=True))
        else:
            digest.update(b"s")
        digest.update(np.asarray(token_ids, dtype="<i4").tobytes())
        return digest.digest()

    async def get(self, key: bytes) -> CacheHit | None:
        (hit,) = await self.get_many([key])
        return hit

    async def put(self, key: bytes, vector: np.ndarray) -> None:
        await self.put_many([(key, vector)])

    async def put_many(self, entries: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """`store`, and wait until L2 has them (or has failed)."""
        self.store(entries)
        await self.flush()

    async def get_many(self, keys: Sequence[bytes]) -> list[CacheHit | None]:
        """Each key's hit or None; what L1 lacks is asked of L2 in one MGET, shared with the
        lookups of other requests made meanwhile (a batch of 2,048 inputs costs one round trip,
        64 concurrent requests a few)."""
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
        values = await self._l2_lookup([self._l2_key(keys[i]) for i in absent])
        for i, raw in zip(absent, values, strict=True):
            if raw is None or len(raw) != 4 * self.dimension:
                continue
            vector = np.frombuffer(raw, dtype="<f4")
            self._remember(keys[i], vector)
            hits[i] = CacheHit(vector, "l2")
        return hits

    def store(self, entries: Sequence[tuple[bytes, np.ndarray]]) -> None:
        """Keep each (key, vector) in L1 now, and have it written to L2 in the background."""
        for key, vector in entries:
            # A copy, never a view: a row of a batch would keep the whole batch (up to 2,048 x
            # 384 floats, 3 MB) alive as long as the entry lives, unbounding L1_CACHE_SIZE.
            copy = np.array(vector, dtype="<f4", copy=True)
            copy.setflags(write=False)
            self._remember(key, copy)
            if self.l2_ttl > 0 and self.link.available and len(self._stores) < MAX_PENDING_STORES:
                self._stores.append((self._l2_key(key), copy.tobytes()))
        if self._stores and self._writer is None:
            self._writer = asyncio.create_task(self._write_l2(), name="l2-cache-writer")

    async def flush(self) -> None:
        """Wait until the stores made so far are written to L2 (or have failed)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def _l2_lookup(self, l2_keys: list[str]) -> list[bytes | None]:
        future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._lookups.append((l2_keys, future))
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_l2(), name="l2-cache-reader")
        return await future

    async def _read_l2(self) -> None:
        """MGET for every lookup waiting, again until none is: while one is in flight, the
        lookups that arrive wait for the next, together."""
        lookups: list[tuple[list[str], asyncio.Future[list[bytes | None]]]] = []
        try:
            while self._lookups:
                lookups, self._lookups = self._lookups, []
                wanted = [key for keys, _ in lookups for key in keys]
                values: list[bytes | None]
                try:
                    values = await self.link.client.mget(wanted)
                except (aioredis.RedisError, OSError) as exc:
                    self.link.failed(exc)
                    values = [None] * len(wanted)  # misses: the model answers instead
                offset = 0
                for keys, future in lookups:
                    if not future.done():  # its request may have gone
                        future.set_result(values[offset : offset + len(keys)])
                    offset += len(keys)
        finally:
            # Only if cancelled mid-way (shutdown): nobody may wait for an answer forever.
            for _, future in (*lookups, *self._lookups):
                future.cancel()
            self._lookups = []
            self._reader = None

    async def _write_l2(self) -> None:
        try:
            while self._stores:
                stores, self._stores = self._stores, []
                try:
                    async with self.link.client.pipeline(transaction=False) as pipe:
                        for l2_key, value in stores:
                            pipe.set(l2_key, value, ex=self.l2_ttl)
                        await pipe.execute()
                except (aioredis.RedisError, OSError) as exc:
                    self.link.failed(exc)
        finally:
            self._writer = None

    def _remember(self, key: bytes, vector: np.ndarray) -> None:
        if self.l1_size <= 0:
            return
        self._l1[key] = vector
        self._l1.move_to_end(key)
        if len(self._l1) > self.l1_size:
            self._l1.popitem(last=False)

    def _l2_key(self, key: bytes) -> str:
        return self.link.key("emb", key.hex())
