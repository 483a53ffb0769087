"""Public names of a package that import their module on first use, so ``import nemo_hf`` and the
command line stay fast: torch, transformers and FAISS load only when a name that needs them is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]], submodules: Mapping[str, str] | None = None
) -> tuple[Callable[[str], object], list[str]]:
    """``(__getattr__, __all__)`` for ``package``; ``modules`` maps each module (relative to it) to its names;
    ``submodules`` maps a name to a module (relative) exported as a whole (``from nemo_hf import florence2``)."""
    home = {name: module for module, names in modules.items() for name in names}
    whole = dict(submodules or {})

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(home[name], package), name)
        if name in whole:
            return importlib.import_module(whole[name], package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, [*home, *whole]
