"""Approximate FAISS indexes over the pool, for pools far larger than COCO: building them, and the
search parameters their top lists need (the negative search itself is ``negatives``)."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from .pool import PoolVectors, sample

_LOG = logging.getLogger(__name__)
_GPU_MAX_K = 2048  # the largest k FAISS GPU indexes search for


def approximate_index(pool: PoolVectors, kind: str, mode: str, seed: int) -> faiss.Index:
    """An IVF, IVF-PQ or HNSW (``kind``) inner-product index over the pool, for pools far larger than COCO.

    IVF and IVF-PQ: sqrt(n) lists, trained on a ``seed``-ed sample of the pool (40 points a list, at
    least 10k) so that training stays minutes at 100M images, an eighth of the lists probed (at least 32).
    IVF-PQ's codes: one byte per 8 dimensions (64 bytes for 512-d; fewer bits on small pools).
    Vectors are added a block at a time, so a memory-mapped pool is never read whole. With faiss-gpu,
    t2i (``mode``) indexes live on the GPUs; i2i ones stay on CPU, since i2i searches need range search
    and ID selectors, which FAISS has on CPU only.
    """
    n, d = len(pool), pool.dim
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        quantizer = faiss.IndexFlatIP(d)
        nlist = int(np.clip(math.sqrt(n), 1, max(1, n // 39)))
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            bits = int(np.clip(math.log2(max(n, 2) / 39), 1, 8))  # k-means wants 39 points a centroid
            index = faiss.IndexIVFPQ(quantizer, d, nlist, _subquantizers(d), bits, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.seed = seed
        index.cp.seed = seed
        if mode == "t2i":
            index = _on_gpus(index)
        index.train(pool.take(sample(np.random.default_rng(seed), np.arange(n), max(40 * nlist, 10_000))))
    for _, block in pool.blocks():
        index.add(block)
    if kind != "hnsw":
        space = faiss.ParameterSpace() if is_cpu(index) else faiss.GpuParameterSpace()
        space.set_index_parameter(index, "nprobe", min(nlist, max(32, nlist // 8)))
    return index


def _subquantizers(d: int) -> int:
    """PQ sub-quantizers: the most that divide ``d`` with at least 8 dimensions each (64 for 512-d)."""
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def _on_gpus(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on every GPU faiss-gpu sees (IVF-PQ lookup tables in fp16, which 64
    sub-quantizers need); ``index`` itself without faiss-gpu or GPUs."""
    if not hasattr(faiss, "GpuMultipleClonerOptions") or faiss.get_num_gpus() == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    _LOG.info("FAISS index on %d GPU(s)", faiss.get_num_gpus())
    return faiss.index_cpu_to_all_gpus(index, co=options)


def is_cpu(index: faiss.Index) -> bool:
    """Whether ``index`` is searched on CPU: GPU ones lack range search and ID selectors, and score in fp16."""
    return not type(index).__name__.startswith(("Gpu", "IndexShards", "IndexReplicas"))


def list_depth(index: faiss.Index, depth: int) -> int:
    """``depth`` capped at the longest top list ``index`` returns: its size, and on GPUs FAISS's largest k."""
    return min(depth, index.ntotal, index.ntotal if is_cpu(index) else _GPU_MAX_K)


def set_depth(index: faiss.Index, depth: int) -> None:
    """Ready ``index`` for top-``depth`` lists: an HNSW graph must explore more candidates than it returns."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = _ef_search(depth)


def selector_parameters(index: faiss.Index):
    """A function ``(allowed, depth) -> faiss.SearchParameters`` for top-``depth`` lists of CPU ``index``
    drawn only from the ``allowed`` IDs (a FAISS ID selector). Search parameters replace the index's
    own, so an IVF index's nprobe is read here, once."""
    if isinstance(index, faiss.IndexHNSW):
        return lambda allowed, depth: faiss.SearchParametersHNSW(sel=allowed, efSearch=_ef_search(depth))
    nprobe = faiss.extract_index_ivf(index).nprobe
    return lambda allowed, depth: faiss.SearchParametersIVF(sel=allowed, nprobe=nprobe)


def _ef_search(depth: int) -> int:
    return max(64, 2 * depth)
