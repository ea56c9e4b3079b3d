"""Serving: the batching engine and the OpenAI-compatible HTTP API."""
