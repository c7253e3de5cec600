"""Smally: a small, fast, self-hosted text-embeddings API."""

__version__ = "0.1.0"
