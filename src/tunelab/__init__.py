"""tunelab: fine-tune language models on real tasks with every PEFT method, side by side."""

import logging

# torchao (imported by transformers and our NF4 code) logs at import that its optional CUDA kernels are
# absent on CPU machines, and torch warns about torchao's enum registration: noise, not user news.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["attach", "disabled", "load", "merge", "save", "trainable_parameters", "unmerge", "__version__"]
_API = {"attach", "disabled", "load", "merge", "save", "trainable_parameters", "unmerge"}


def __getattr__(name: str):
    # The API imports torch and every method: load it on first use, so `import tunelab` (and the CLI's
    # --help and listings) stay fast. `from tunelab import attach` works as before.
    if name in _API:
        from tunelab import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _API)
