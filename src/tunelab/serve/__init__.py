"""Talking to a trained run: ``tunelab chat`` (terminal) and ``tunelab serve`` (OpenAI-compatible HTTP),
both on one batched, streaming generation engine (``tunelab.serve.engine``)."""
