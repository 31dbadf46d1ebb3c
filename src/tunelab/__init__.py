"""tunelab: fine-tune language models on real tasks with every PEFT method, side by side."""
# ruff: noqa: E402

import logging

# torchao (imported by transformers and our NF4 code) logs at import that its optional CUDA kernels are
# absent on CPU machines, and torch warns about torchao's enum registration: noise, not user news.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from tunelab.api import attach, disabled, load, merge, save, trainable_parameters, unmerge

__version__ = "0.1.0"
__all__ = ["attach", "disabled", "load", "merge", "save", "trainable_parameters", "unmerge", "__version__"]
