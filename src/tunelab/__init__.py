"""tunelab: fine-tune language models on real tasks with every PEFT method, side by side."""

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import warnings

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


# Modules that moved into rooms (CHANGELOG.md, "Layout"): the old import paths keep working and warn.
# A name a module no longer holds (it moved to another new module) is listed there too.
MOVED = {
    "advise": "sweeps.advise", "arch": "models.arch", "bench": "training.sizing", "budget": "sweeps.budget",
    "chat_demo": "data.demo_chat", "chat_format": "data.chat_templates", "checkpoint": "runtime.atomic_files",
    "compare": "sweeps.compare", "decode": "evaluation.decoding", "demo": "data.demo_sentiment",
    "distributed": "runtime.distributed", "evaluate": "evaluation.scoring", "fast": "models.lm_loss",
    "fast_eval": "evaluation.inference", "guard": "training.divergence", "head_loss": "models.chunked_loss",
    "held_weights": "runtime.precision", "loadcheck": "methods.load_checks", "metrics": "evaluation.metrics",
    "objectives": "tasks.objectives", "peft_format": "export.peft_format", "pipeline": "data.feature_cache",
    "prefetch": "data.batched_tokenizer", "preflight": "training.preflight", "quant": "models.quantization",
    "quant_load": "models.quantized_loading", "readers": "data.readers", "runlock": "training.run_lock",
    "shadow": "runtime.precision", "splice": "data.prompt_splicing", "tracking": "training.tracking",
    "train": "training.loop", "tune": "sweeps.lr_search",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import tunelab.train`` gives ``tunelab.training.loop`` (with a DeprecationWarning)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(__name__ + ".")
        if fullname.startswith(__name__ + ".") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.removeprefix(__name__ + '.')]}"
        warnings.warn(f"{spec.name} moved to {new}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __dir__():
    return sorted(set(globals()) | _API)
