"""What serving can refuse with, besides the model's own refusals (app.model: TextTooLong,
QueueFull). The HTTP layer turns each into its answer (app/http/errors.py, `from_domain`)."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """PostgreSQL (keys, ledger) cannot be reached; the message says which store, for people."""


class Busy(Exception):
    """Every connection to a store is in use: retry shortly (not an outage, so no fallback)."""
