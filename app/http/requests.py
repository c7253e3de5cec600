"""The API's request bodies, declared once (app/http/fields.py): the handlers parse with them and
/openapi.json publishes their schemas."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.http.fields import (
    Choice,
    Flag,
    ModelName,
    OptionalInteger,
    OptionalString,
    RequestBody,
    Text,
    Texts,
)
from app.model.engine import ModelManifest

# Inputs of one /v1/embeddings request (OpenAI's own limit).
MAX_INPUTS = 2048


@dataclass(frozen=True, slots=True)
class Served:
    """What the bodies' rules depend on: the served model and the token limit."""

    model: str
    dimension: int
    max_tokens: int
    aliases: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings, manifest: ModelManifest) -> Served:
        return cls(manifest.name, manifest.dimension, settings.max_tokens, settings.model_aliases)

    @property
    def model_names(self) -> tuple[str, ...]:
        """What `model` may say: the served name, its sentence-transformers id, the aliases."""
        return (self.model, f"sentence-transformers/{self.model}", *self.aliases)


def _text_description(served: Served) -> str:
    return (
        f"At most {served.max_tokens} tokens including [CLS] and [SEP]; a longer text is refused "
        "(`text_too_long`) unless `truncate` is true, never silently truncated."
    )


def _truncate(served: Served) -> Flag:
    limit = served.max_tokens
    return Flag(
        "truncate",
        default=False,
        description=f"A text over {limit} tokens: embed its first {limit} ([CLS], the first "
        f"{max(limit - 2, 0)} word pieces, [SEP]: sentence-transformers' `max_seq_length`) "
        "instead of refusing it with `text_too_long`. The token counts in the answer are the "
        "embedded ones.",
    )


def embed_body(served: Served) -> RequestBody:
    """POST /v1/embed."""
    return RequestBody(
        (
            Text("text", _text_description(served)),
            Flag("normalize", default=True, description="L2-normalise the vector (unit length)."),
            _truncate(served),
        ),
        example={"text": "The quick brown fox"},
        not_an_object='request body must be a JSON object like {"text": "..."}',
    )


def embeddings_body(served: Served) -> RequestBody:
    """POST /v1/embeddings (OpenAI's request, plus `truncate`)."""
    return RequestBody(
        (
            ModelName("model", served.model_names),
            Texts("input", _text_description(served), max_items=MAX_INPUTS),
            Choice(
                "encoding_format",
                ("float", "base64"),
                default="float",
                description="`base64`: little-endian float32 bytes.",
            ),
            OptionalInteger(
                "dimensions",
                served.dimension,
                description="Keep the first N dimensions, re-normalised.",
            ),
            OptionalString("user", description="Accepted and ignored."),
            _truncate(served),
        ),
        example={"model": served.model, "input": ["The quick brown fox", "hello"]},
        not_an_object="request body must be a JSON object",
    )


@dataclass(frozen=True, slots=True)
class RequestBodies:
    """Built once per app, when the model is known (the lifespan)."""

    embed: RequestBody
    embeddings: RequestBody

    @classmethod
    def of(cls, served: Served) -> RequestBodies:
        return cls(embed_body(served), embeddings_body(served))
