"""Models: loading (hub id, local folder, embedded GGUF), the one architecture table, heads,
quantization (NF4/NF2/uniform) and loading in 4 bits, and the causal LM loss at loss positions."""


def __getattr__(name: str):
    # ``tunelab.models`` was one module before it became a room: its names (load, resolve, EMBEDDED, cache_dir, ...) still
    # import from here, lazily, from ``tunelab.models.loading``.
    import importlib
    from pathlib import Path

    if name.startswith("__") or (Path(__file__).parent / f"{name}.py").exists():  # a submodule: imported as one
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("tunelab.models.loading"), name)
    except AttributeError:
        raise AttributeError(f"module 'tunelab.models' has no attribute {name!r}") from None
