"""The embedding engine: tokenize -> ONNX forward pass (mean pooling in the graph) -> normalise.

It knows nothing of HTTP, and nothing of concurrency: `Engine` is blocking and is driven
from threads by `app.model.runner.EngineRunner`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class ModelError(Exception):
    """The model directory is missing, incomplete or unreadable."""


class TextTooLong(Exception):
    """`tokens` is the exact count, or with `exact=False` a lower bound (the text was refused
    by counting its pieces, without tokenizing it); `chars` is set instead when the text was
    refused for its length in characters alone."""

    def __init__(
        self,
        index: int,
        tokens: int,
        max_tokens: int,
        *,
        inputs: int,
        exact: bool = True,
        chars: int | None = None,
    ) -> None:
        if chars is not None:
            what = f"{chars} characters, more than the {max_tokens * MAX_CHARS_PER_TOKEN} read"
        else:
            what = f"{tokens if exact else f'at least {tokens}'} tokens"
        super().__init__(f"input {index} has {what}: the limit is {max_tokens} tokens")
        self.index = index
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.inputs = inputs  # how many texts were tokenized together
        self.exact = exact
        self.chars = chars


# Texts longer than this many characters per token of the limit have their pieces counted
# before tokenizing (below, a text tokenizes in well under a millisecond and its 400 keeps an
# exact count); a text of 1,024 characters and 129 counted pieces costs a scan, not a tokenizer.
COUNT_PIECES_AFTER_CHARS_PER_TOKEN = 8
# No text is tokenized past this many characters per token of the limit (8,192 for 128): more
# is refused, or with truncate cut there. Natural text has 3-6 characters per token; this bounds
# the tokenizer's work per text for texts of whitespace, marks or overlong words.
MAX_CHARS_PER_TOKEN = 64

_WHITESPACE = r"\t\n\r \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
# ASCII punctuation: BERT's pre-tokenizer makes each such character a piece of its own.
_ASCII_PUNCTUATION = r"!-/:-@\[-`{-~"
# Pieces as the BERT tokenizer will see them at least: a single ASCII punctuation character, or
# a run of anything else up to whitespace (only characters its normaliser also treats as
# whitespace, a subset of them) or such punctuation, so it never sees fewer, longer pieces.
_PIECE = re.compile(f"[{_ASCII_PUNCTUATION}]|[^{_WHITESPACE}{_ASCII_PUNCTUATION}]+")
# A run with a letter or digit yields at least one word piece ([UNK] at worst); a run of marks
# or control characters alone might be removed by normalisation.
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


def end_of_pieces(text: str, count: int) -> int | None:
    """Where the `count`-th sure piece ends (so `text[:end]` tokenizes to at least `count` word
    pieces, the same first ones as the whole text: BERT's tokenization is word-local, and every
    piece counted here ends at whitespace or punctuation), or None when the text has fewer.
    Costs the pieces scanned, not the text."""
    seen = 0
    for piece in _PIECE.finditer(text):
        run = piece.group()
        if (len(run) == 1 and run in _ASCII_PUNCTUATION_SET) or _LETTER_OR_DIGIT.search(run):
            seen += 1
            if seen == count:
                return piece.end()
    return None


_ASCII_PUNCTUATION_SET = frozenset(
    chr(c) for c in (*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127))
)


@dataclass(frozen=True, slots=True)
class ModelManifest:
    name: str
    dimension: int
    onnx_sha256: str

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        path = model_dir / "manifest.json"
        try:
            data = json.loads(path.read_text())
            return cls(
                name=str(data["name"]),
                dimension=int(data["dimension"]),
                onnx_sha256=str(data["onnx_sha256"]),
            )
        except FileNotFoundError:
            raise ModelError(f"no model at {model_dir} (run `make model`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"invalid {path}: {exc}") from None


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (sentence-transformers' Normalize layer)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class Engine:
    """Blocking engine around one ONNX Runtime session and one tokenizer."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_tokens: int,
        threads: int = 0,
        count_pieces_after: int | None = None,
    ) -> None:
        self.manifest = ModelManifest.load(model_dir)
        self.max_tokens = max_tokens
        self.count_pieces_after = (
            max_tokens * COUNT_PIECES_AFTER_CHARS_PER_TOKEN
            if count_pieces_after is None
            else count_pieces_after
        )
        self.max_text_chars = max_tokens * MAX_CHARS_PER_TOKEN
        for required in ("model.onnx", "tokenizer.json"):
            if not (model_dir / required).is_file():
                raise ModelError(f"{model_dir / required} is missing (run `make model`)")

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The packaged tokenizer pads every input to 128 and silently truncates: `infer` pads
        # to the longest input of its batch instead, and nothing is truncated, so over-long
        # input is refused rather than cut.
        self.pad_id = int((self.tokenizer.padding or {}).get("pad_id", 0))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ORT's threads otherwise spin between passes, taking the cores the event loop needs
        # to feed them: /v1/embed at concurrency 64 went from ~285 to ~395 embeddings/s
        # without spinning (2 cores, A/B twice on the same loaded machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = {i.name for i in self.session.get_inputs()}

    def tokenize(self, texts: Sequence[str], *, truncate: bool = False) -> list[list[int]]:
        """Token ids of each text (with [CLS]/[SEP], unpadded). Over `max_tokens`: raises
        TextTooLong, naming the first offender with its full count, or with `truncate` keeps
        its first `max_tokens` (sentence-transformers' max_seq_length: [CLS], the first
        max_tokens - 2 word pieces, [SEP])."""
        texts = list(texts)
        pieces = self.max_tokens - 2  # between [CLS] and [SEP]
        for index, text in enumerate(texts):
            # Refused or cut by counting pieces first: a megabyte of text costs ~260 ms in the
            # tokenizer, its first pieces microseconds.
            long = len(text) > max(self.count_pieces_after, pieces) and pieces >= 0
            end = end_of_pieces(text, pieces + 1) if long else None
            if end is None and len(text) > self.max_text_chars:
                if not truncate:
                    raise TextTooLong(
                        index, 0, self.max_tokens, inputs=len(texts), exact=False, chars=len(text)
                    )
                end = self.max_text_chars
            if end is None:
                continue
            if not truncate:
                raise TextTooLong(
                    index, self.max_tokens + 1, self.max_tokens, inputs=len(texts), exact=False
                )
            texts[index] = text[:end]  # with the same first pieces
        # The encodings (offsets, token strings: ~100 MB for a megabyte of text) are dropped at
        # once, not kept alive by a TextTooLong's traceback until the heap is trimmed.
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts)]
        for index, row in enumerate(ids):
            if len(row) > self.max_tokens:
                if not truncate:
                    raise TextTooLong(index, len(row), self.max_tokens, inputs=len(ids))
                # The post-processor ends every row with [SEP]: keep it after the cut.
                ids[index] = row[: self.max_tokens - 1] + row[-1:]
        return ids

    def infer(self, token_ids: Sequence[Sequence[int]], *, normalize: bool = True) -> np.ndarray:
        """One forward pass over the batch, padded to its longest row. float32 [n, dimension]."""
        longest = max(len(row) for row in token_ids)
        ids = np.full((len(token_ids), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(token_ids):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (pooled,) = self.session.run(["sentence_embedding"], feeds)
        vectors = np.ascontiguousarray(pooled, dtype=np.float32)
        return l2_normalize(vectors) if normalize else vectors
