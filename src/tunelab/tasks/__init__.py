"""Every module in this package registers one task family in ``TASKS`` on import."""

import importlib
import pkgutil

from tunelab.tasks.base import TASKS

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASKS"]
