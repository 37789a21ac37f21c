"""A package's public names imported on first use (PEP 562), so that importing one light
submodule (the execution plan's tables, the results folder, a calibration's thresholds) never
pulls in its heavy siblings (torch): what lets a deployment without torch use them."""
from __future__ import annotations

import importlib

__all__ = ["exports"]


def exports(package: str, owners: dict[str, str]):
    """``(__getattr__, __dir__, __all__)`` for ``package``, whose names ``owners`` maps to the
    submodule (relative, without the dot) that defines each."""
    def getattr_(name):
        if name not in owners:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{owners[name]}")
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # once: later reads are plain
        return value

    def dir_():
        return sorted(set(vars(importlib.import_module(package))) | set(owners))

    return getattr_, dir_, list(owners)
