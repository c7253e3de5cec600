"""The embedding engine: tokenize -> ONNX forward pass (mean pooling in the graph) -> normalise.

It knows nothing of HTTP. `Embedder` is blocking and thread-safe for one caller at a time;
`EmbeddingService` puts it behind a single worker thread so the event loop never runs model work.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class ModelError(Exception):
    """The model directory is missing, incomplete or unreadable."""


class TextTooLong(Exception):
    def __init__(self, index: int, tokens: int, max_tokens: int) -> None:
        super().__init__(f"input {index} has {tokens} tokens, more than the limit of {max_tokens}")
        self.index = index
        self.tokens = tokens
        self.max_tokens = max_tokens


@dataclass(frozen=True, slots=True)
class ModelManifest:
    name: str
    dimension: int
    max_tokens: int
    onnx_sha256: str

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        path = model_dir / "manifest.json"
        try:
            data = json.loads(path.read_text())
            return cls(
                name=str(data["name"]),
                dimension=int(data["dimension"]),
                max_tokens=int(data["max_tokens"]),
                onnx_sha256=str(data["onnx_sha256"]),
            )
        except FileNotFoundError:
            raise ModelError(f"no model at {model_dir} (run `make model`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"invalid {path}: {exc}") from None


@dataclass(frozen=True, slots=True)
class EmbeddingBatch:
    vectors: np.ndarray  # float32 [n, dimension]
    token_counts: list[int]


class Embedder:
    """Blocking engine around one ONNX Runtime session and one tokenizer."""

    def __init__(self, model_dir: Path, *, max_tokens: int, threads: int = 0) -> None:
        self.manifest = ModelManifest.load(model_dir)
        self.max_tokens = max_tokens
        for required in ("model.onnx", "tokenizer.json"):
            if not (model_dir / required).is_file():
                raise ModelError(f"{model_dir / required} is missing (run `make model`)")

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The packaged tokenizer pads every input to 128 and silently truncates: pad to the
        # longest input of a batch instead, and never truncate, so over-long input is refused.
        self.tokenizer.no_truncation()
        padding = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(
            pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]")
        )

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> EmbeddingBatch:
        """Embed `texts`; raises TextTooLong (naming the first offender) before any inference."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        counts = mask.sum(axis=1).tolist()
        for index, count in enumerate(counts):
            if count > self.max_tokens:
                raise TextTooLong(index, count, self.max_tokens)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (pooled,) = self.session.run(["sentence_embedding"], feeds)
        vectors = np.ascontiguousarray(pooled, dtype=np.float32)
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return EmbeddingBatch(vectors=vectors, token_counts=counts)


class EmbeddingService:
    """Async front of the engine: model work runs on one dedicated thread, in arrival order.

    One thread because ONNX Runtime already spreads a forward pass over the cores; two passes at
    once would only contend for them.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")

    @property
    def manifest(self) -> ModelManifest:
        return self.embedder.manifest

    async def embed(self, texts: Sequence[str], *, normalize: bool = True) -> EmbeddingBatch:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: self.embedder.embed(texts, normalize=normalize)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
