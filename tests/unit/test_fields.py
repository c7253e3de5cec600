"""app/http/fields.py: a text is refused as blank exactly when its schema says so."""

from __future__ import annotations

import re
import sys

import pytest

from app.http.errors import InvalidRequest
from app.http.fields import Texts, blank, text_schema

# ECMA-262's WhiteSpace and LineTerminator: what `\s` means in a JSON Schema pattern.
ECMA_WHITESPACE = set("\t\n\x0b\x0c\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff") | {
    chr(c) for c in range(0x2000, 0x200B)
}


def test_blank_means_whitespace_to_python_or_to_a_json_schema() -> None:
    pattern = re.compile(text_schema("a text")["pattern"])
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        whitespace = char.isspace() or char in ECMA_WHITESPACE
        assert blank(char * 2) is whitespace, hex(code)
        assert (pattern.search(char * 2) is None) is whitespace, hex(code)


@pytest.mark.parametrize("text", ["\x1d\x1d", " \ufeff\t", "\x85", ""])
def test_a_blank_text_is_refused_and_the_schema_says_so(text: str) -> None:
    field = Texts(name="input", description="texts", max_items=4)
    with pytest.raises(InvalidRequest, match="only whitespace"):
        field.parse({"input": [text]})
    assert re.search(text_schema("a text")["pattern"], text) is None


def test_a_text_of_control_characters_is_not_blank() -> None:
    assert not blank("\x00\x1b")
    assert Texts(name="input", description="texts", max_items=4).parse({"input": "\x00"}) == [
        "\x00"
    ]
