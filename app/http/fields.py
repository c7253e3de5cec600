"""Request bodies, declared once: each field knows its JSON Schema (for /openapi.json) and how to
read itself from a parsed body (raising `InvalidRequest` naming the field), so what the contract
says and what the handlers accept cannot drift apart.

Fields are checked in declaration order; the first offender is the one reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.http.errors import InvalidRequest, ModelNotFound

JSON = "application/json"


class Field:
    name: str
    required: bool = False

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, payload: dict[str, Any]) -> Any:
        raise NotImplementedError


# What "only whitespace" means, for the schema's pattern and the parser alike: every character
# that Python's str.isspace() or a JSON Schema (ECMA-262) `\s` counts as whitespace. The two
# disagree (Python: the separators U+001C-U+001F and U+0085; ECMA: U+FEFF), and a text the
# contract accepts must not be refused for being blank (schemathesis found "\x1d\x1d").
WHITESPACE = (  # a regular expression character class, ranges included
    "\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
NOT_WHITESPACE = f"[^{WHITESPACE}]"
_NOT_WHITESPACE = re.compile(NOT_WHITESPACE)


def blank(text: str) -> bool:
    """Empty, or only whitespace (WHITESPACE)."""
    return _NOT_WHITESPACE.search(text) is None


def text_schema(description: str) -> dict[str, Any]:
    # Not empty and not only whitespace.
    return {"type": "string", "minLength": 1, "pattern": NOT_WHITESPACE, "description": description}


@dataclass(frozen=True, slots=True)
class Text(Field):
    """One text to embed (required)."""

    name: str
    description: str
    required: bool = True

    def schema(self) -> dict[str, Any]:
        return text_schema(self.description)

    def parse(self, payload: dict[str, Any]) -> str:
        text = payload.get(self.name)
        if text is None:
            raise InvalidRequest(f"'{self.name}' is required", param=self.name)
        if not isinstance(text, str):
            raise InvalidRequest(f"'{self.name}' must be a string", param=self.name)
        if blank(text):
            raise InvalidRequest(
                f"'{self.name}' must not be empty or only whitespace", param=self.name
            )
        return text


@dataclass(frozen=True, slots=True)
class Texts(Field):
    """One text or a non-empty array of up to `max_items` texts (required); parsed to a list."""

    name: str
    description: str
    max_items: int
    required: bool = True

    def schema(self) -> dict[str, Any]:
        text = text_schema(self.description)
        array = {"type": "array", "items": text, "minItems": 1, "maxItems": self.max_items}
        return {"oneOf": [text, array]}

    def parse(self, payload: dict[str, Any]) -> list[str]:
        raw = payload.get(self.name)
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw:
            texts = raw
        else:
            raise InvalidRequest(
                f"'{self.name}' must be a string or a non-empty array of strings", param=self.name
            )
        if len(texts) > self.max_items:
            raise InvalidRequest(
                f"'{self.name}' has {len(texts)} items; at most {self.max_items}", param=self.name
            )
        for index, text in enumerate(texts):
            param = f"{self.name}[{index}]" if isinstance(raw, list) else self.name
            if not isinstance(text, str):
                # Token arrays (what OpenAI clients send after tiktoken) mean nothing here.
                raise InvalidRequest(
                    f"{param} must be a string (token arrays are not accepted)", param=param
                )
            if blank(text):
                raise InvalidRequest(f"{param} must not be empty or only whitespace", param=param)
        return texts


@dataclass(frozen=True, slots=True)
class Flag(Field):
    name: str
    default: bool
    description: str

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean", "default": self.default, "description": self.description}

    def parse(self, payload: dict[str, Any]) -> bool:
        value = payload.get(self.name, self.default)
        if not isinstance(value, bool):
            raise InvalidRequest(f"'{self.name}' must be true or false", param=self.name)
        return value


@dataclass(frozen=True, slots=True)
class Choice(Field):
    name: str
    choices: tuple[str, ...]
    default: str
    description: str

    def schema(self) -> dict[str, Any]:
        return {
            "type": "string",
            "enum": list(self.choices),
            "default": self.default,
            "description": self.description,
        }

    def parse(self, payload: dict[str, Any]) -> str:
        value = payload.get(self.name, self.default)
        if value not in self.choices:
            allowed = " or ".join(repr(choice) for choice in self.choices)
            raise InvalidRequest(f"'{self.name}' must be {allowed}", param=self.name)
        return value


@dataclass(frozen=True, slots=True)
class ModelName(Field):
    """The model asked for: the served one or one of its accepted names (required)."""

    name: str
    names: tuple[str, ...]  # the served name first
    required: bool = True

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.names)}

    def parse(self, payload: dict[str, Any]) -> str:
        model = payload.get(self.name)
        if not isinstance(model, str) or not model:
            raise InvalidRequest(f"'{self.name}' is required (a string)", param=self.name)
        if model not in self.names:
            shown = model if len(model) <= 64 else model[:64] + "..."  # never echo a megabyte
            raise ModelNotFound(
                f"the model {shown!r} is not served here; use {self.names[0]!r}", param=self.name
            )
        return model


@dataclass(frozen=True, slots=True)
class OptionalInteger(Field):
    """An integer from 1 to `maximum`, or null / absent (None)."""

    name: str
    maximum: int
    description: str

    def schema(self) -> dict[str, Any]:
        return {
            "type": ["integer", "null"],
            "minimum": 1,
            "maximum": self.maximum,
            "description": self.description,
        }

    def parse(self, payload: dict[str, Any]) -> int | None:
        value = payload.get(self.name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one number type: 64.0 is the integer 64
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.maximum
        ):
            raise InvalidRequest(
                f"'{self.name}' must be an integer from 1 to {self.maximum}", param=self.name
            )
        return value


@dataclass(frozen=True, slots=True)
class OptionalString(Field):
    name: str
    description: str

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"], "description": self.description}

    def parse(self, payload: dict[str, Any]) -> str | None:
        value = payload.get(self.name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{self.name}' must be a string", param=self.name)
        return value


@dataclass(frozen=True, slots=True)
class RequestBody:
    fields: tuple[Field, ...]
    example: dict[str, Any]
    not_an_object: str  # the message for a body that is JSON but not an object

    def schema(self) -> dict[str, Any]:
        schema = {
            "type": "object",
            "required": [field.name for field in self.fields if field.required],
            "properties": {field.name: field.schema() for field in self.fields},
        }
        return {"required": True, "content": {JSON: {"schema": schema, "example": self.example}}}

    def parse(self, payload: Any) -> dict[str, Any]:
        """Each field's value by name, or InvalidRequest for the first field that is wrong."""
        if not isinstance(payload, dict):
            raise InvalidRequest(self.not_an_object)
        return {field.name: field.parse(payload) for field in self.fields}
