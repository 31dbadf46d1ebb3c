"""tunelab: fine-tune language models on real tasks with every PEFT method, side by side."""

from tunelab.api import attach, load, merge, save, trainable_parameters, unmerge

__version__ = "0.1.0"
__all__ = ["attach", "load", "merge", "save", "trainable_parameters", "unmerge", "__version__"]
