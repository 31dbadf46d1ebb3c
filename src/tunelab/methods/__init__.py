"""Every module in this package registers one or more methods in ``METHODS`` on import."""

import importlib
import pkgutil

from tunelab.methods.base import METHODS

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS"]
