"""The hub-ready folder: `build_folder` writes it (Parquet shards, manifest, card, kept embeddings) and
`push_folder` uploads it.

Modules: `build` (writing a folder atomically), `manifest` (``nemo_hf.json`` and the names of a build's
files), `card` (the dataset card), `embeddings` (the mining embeddings a folder keeps), `push` (one
atomic Hub commit).
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".build": ["build_folder", "resolve_configs", "MiningOptions", "OutFolderError"],
        ".manifest": ["BuildReport", "MANIFEST"],
        ".push": ["push_folder", "PushError"],
    },
)
