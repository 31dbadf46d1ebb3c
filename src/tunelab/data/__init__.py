"""Data: readers (files, Parquet/Arrow, the hub), chat templates, tokenization and its cache, prompt
splicing, batching, and the small data sets tunelab writes itself for its demos."""


def __getattr__(name: str):
    # ``tunelab.data`` was one module before it became a room: its names (Collator, batches, encode_lm, ...) still
    # import from here, lazily, from ``tunelab.data.encoding``.
    import importlib
    from pathlib import Path

    if name.startswith("__") or (Path(__file__).parent / f"{name}.py").exists():  # a submodule: imported as one
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("tunelab.data.encoding"), name)
    except AttributeError:
        raise AttributeError(f"module 'tunelab.data' has no attribute {name!r}") from None
