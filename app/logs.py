"""One JSON object per log line, with the request id of the request being served.

Keys and request texts are never passed to the logger; the access log names method, path,
status and duration only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})

# Attributes a LogRecord always has; anything else passed through `extra=` is emitted as a field.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            line = orjson.dumps(entry, default=str).decode()
        except TypeError:
            # A lone surrogate (a path of undecodable bytes, say): json escapes what orjson refuses.
            return json.dumps(entry, default=str)
        # One record, one line, for every reader: escape the line breaks JSON allows unescaped.
        return line.translate(_LINE_BREAKS)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Hypercorn's own access log would duplicate ours (and log query strings); keep its errors.
    logging.getLogger("hypercorn.access").disabled = True
    for noisy in ("psycopg.pool", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
