"""Public names of a package that import their module on first use, so ``import nemo_hf`` and the
command line stay fast: torch, transformers and FAISS load only when a name that needs them is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], object], list[str]]:
    """``(__getattr__, __all__)`` for ``package``; ``modules`` maps each module (relative to it) to its names."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(home[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(home)
