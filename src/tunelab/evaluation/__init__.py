"""Evaluation: batched scoring, one decoding loop (shared with serving), inference paths that give
the plain forward's scores faster, and the task metrics (the one definition the report also uses)."""
