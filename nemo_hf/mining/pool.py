"""Embeddings as the negative search reads them: checked, sampled, and the pool's rows gathered or in blocks.

The image embeddings may be a float16 or memory-mapped matrix of a pool too large for RAM: nothing
here reads such a matrix whole.
"""

from __future__ import annotations

import numpy as np

_BLOCK_ROWS = 65536  # rows of the image embeddings read at once where they may be memory-mapped (128 MB at 512-d)


def unit_rows(emb: np.ndarray, name: str, in_ram: bool = True) -> np.ndarray:
    """``emb`` checked to be L2-normalised rows, as contiguous float32 in RAM; with ``in_ram=False`` a
    float16 array or a float16/float32 ``np.memmap`` (a pool too large for RAM) is checked block by
    block and kept as it is."""
    kept = not in_ram and isinstance(emb, np.ndarray) and (
        emb.dtype == np.float16 or isinstance(emb, np.memmap) and emb.dtype == np.float32
    )
    if not kept:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) matrix, got shape {emb.shape}")
    tolerance = 4e-3 if emb.dtype == np.float16 else 1e-3  # float16 rounds each entry by up to 2**-11
    for start in range(0, len(emb), _BLOCK_ROWS):
        block = np.asarray(emb[start : start + _BLOCK_ROWS], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))  # no (n, d) temporary: 2 GB at 1M images
        bad = np.flatnonzero(~(np.abs(norms - 1.0) <= tolerance))
        if bad.size:
            row = start + bad[0]
            raise ValueError(f"{name} row {row} has norm {norms[bad[0]]:.4g}: embeddings must be L2-normalised")
    return emb


def sample(rng: np.random.Generator, population: np.ndarray, size: int) -> np.ndarray:
    """``size`` of ``population`` drawn without replacement, sorted (sequential reads); all of it if smaller."""
    if len(population) <= size:
        return population
    return np.sort(rng.choice(population, size=size, replace=False))


class PoolVectors:
    """The pool's rows of the image embeddings as float32, gathered or in blocks.

    An in-RAM float32 matrix is copied to a contiguous pool matrix once (the exact search's BLAS
    operand). Anything else (a float16 or memory-mapped matrix, for pools too large for RAM) is never
    read whole: rows are gathered as needed and products run over blocks of ``_BLOCK_ROWS`` rows.
    """

    def __init__(self, image: np.ndarray, pool: np.ndarray):
        self.pool, self.dim = pool, image.shape[1]
        in_ram = type(image) is np.ndarray and image.dtype == np.float32
        self.matrix = (image if len(pool) == len(image) else np.ascontiguousarray(image[pool])) if in_ram else None
        self.image = image

    def __len__(self) -> int:
        return len(self.pool)

    def take(self, pos: np.ndarray) -> np.ndarray:
        """float32 vectors of pool positions ``pos`` (any shape: the result adds a last axis)."""
        if self.matrix is not None:
            return self.matrix[pos]
        rows = self.pool[pos].ravel()
        order = np.argsort(rows, kind="stable")  # ascending reads: sequential pages of a memory map
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = self.image[rows[order]]
        return out.reshape(*np.shape(pos), self.dim)

    def dot(self, pos: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Cosines of pool positions ``pos`` (1-d) with one vector, gathered ``_BLOCK_ROWS`` at a time."""
        return np.concatenate(
            [self.take(pos[s : s + _BLOCK_ROWS]) @ vector for s in range(0, len(pos), _BLOCK_ROWS)]
            or [np.zeros(0, dtype=np.float32)]
        )

    def blocks(self):
        """(start, float32 block) over the pool, in order."""
        if self.matrix is not None:
            yield 0, self.matrix
            return
        for start in range(0, len(self.pool), _BLOCK_ROWS):
            yield start, self.take(np.arange(start, min(start + _BLOCK_ROWS, len(self.pool))))

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """``queries @ pool.T`` as float32 (len(queries), len(pool))."""
        if self.matrix is not None:
            return queries @ self.matrix.T
        out = np.empty((len(queries), len(self.pool)), dtype=np.float32)
        for start, block in self.blocks():
            np.matmul(queries, block.T, out=out[:, start : start + len(block)])
        return out
