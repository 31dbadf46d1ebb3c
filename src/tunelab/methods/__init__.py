"""Every module in this package registers one or more methods in ``METHODS`` on import."""

import importlib
import pkgutil

from pydantic import ValidationError

from tunelab.errors import explain
from tunelab.methods.base import METHODS

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def method_config(name: str, params: dict):
    """Validate ``params`` against method ``name``'s schema (clear error on a bad key/value)."""
    method = METHODS.get(name)
    try:
        return method.Config(**params)
    except ValidationError as e:
        raise ValueError(f"bad parameters for method '{name}':\n{explain(e, method.Config)}") from None


__all__ = ["METHODS", "method_config"]
