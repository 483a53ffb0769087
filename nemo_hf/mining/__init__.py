"""Mining NeMo's negatives: embed images and sentences, then keep for each sentence the K most similar
pool images that tau does not drop as likely false negatives.

Modules: `embed` (`Embedder`: any CLIP-like checkpoint, batched forwards), `cache` (the on-disk embedding
cache and its memory-mapped matrix), `identity` (which model made an embedding), `negatives` (the rule:
`MiningParams`, `resolve_tau`, `select_negatives`), `pool` (pool embeddings read in blocks), `index` (FAISS
indexes and their search parameters), `refs` (refs in, the dataset's negative columns out), `ranks`
(mining under torchrun / accelerate).
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".embed": ["Embedder", "ModelLoadError", "demo_embedder"],
        ".cache": ["EmbeddingCache"],
        ".identity": ["ModelIdentity", "checkpoint_identity"],
        ".negatives": ["MiningParams", "Selection", "resolve_tau", "select_negatives", "build_index"],
        ".refs": ["mine_refs"],
        ".ranks": ["Ranks", "RankFailure"],
    },
)
