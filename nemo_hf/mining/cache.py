"""The on-disk embedding cache.

It is keyed by everything that changes the embeddings (model identity, dtype, preprocessing, nemo_hf version)
and then per image id and content (bytes' digest, or a file's size, modification and change times), or per
sentence id and text; it is written in chunks, each atomically, so an interrupted run resumes where it stopped.
Each chunk carries its key's digest, checked on read: a chunk copied into another model's cache is not used.
Image embeddings can also come as a memory-mapped ``.npy`` matrix filled from the cache chunk by chunk,
for pools too large to hold in RAM.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..folder.files import is_regular_file

# what np.load(allow_pickle=False) raises on a damaged, truncated or hostile .npz (a header declaring a huge array)
UNREADABLE_NPZ = (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile)
CHUNK_FORMAT = 2  # 2: each chunk stamped with its cache key's digest


class EmbeddingCache:
    """Embeddings under one cache key: ``chunk-*.npz`` files (keys + vectors), each written atomically.

    A run that stops keeps every chunk written; a chunk that cannot be read (a copy cut short, a
    filesystem without atomic rename) is dropped with a warning and its embeddings recomputed.
    """

    def __init__(self, directory: str | Path, meta: dict):
        meta = {"format": CHUNK_FORMAT, **meta}
        self.key = key_digest(meta)
        self.directory = cache_directory(directory, meta)

    @classmethod
    def for_kind(cls, cache_dir: str | Path, kind: str, meta: dict) -> EmbeddingCache:
        """The cache of ``kind`` ("image" or "text") embeddings under ``meta``, a folder of ``cache_dir``."""
        return cls(Path(cache_dir) / f"{kind}-{key_digest({'format': CHUNK_FORMAT, **meta})}", meta)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r})"

    def load(self) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for keys, vectors in self._chunks():
            for key, vector in zip(keys, vectors):
                found.setdefault(key, vector)
        return found

    def keys(self) -> set[str]:
        """The keys present, read without their vectors."""
        present: set[str] = set()
        for keys, _ in self._chunks(vectors=False):
            present.update(keys)
        return present

    def matrix_path(self, keys: Sequence[str]) -> Path:
        """Where ``write_matrix`` puts the matrix of ``keys``: named by their ordered list and the cache key,
        which finds it again (and not a matrix copied from another cache)."""
        digest = hashlib.sha256(self.key.encode() + b"\0")
        for key in keys:
            digest.update(key.encode() + b"\0")
        return self.directory / f"matrix-{digest.hexdigest()[:20]}.npy"

    def write_matrix(self, path: Path, keys: Sequence[str], dim: int) -> np.memmap:
        """Write ``path``, a ``(len(keys), dim)`` float32 ``.npy`` file whose row i is ``keys[i]``'s vector, and
        return it memory-mapped read-only.

        Filled one chunk at a time: RAM holds one chunk and a key -> row dict, never the matrix, so a pool
        of millions of images can be mined. Written under a temporary name, then renamed; the other
        ``matrix-*.npy`` files here are removed first, since each is as large as a pool's embeddings.
        """
        for old in self.directory.glob("matrix-*.npy"):
            if old != path and not old.is_dir():
                old.unlink(missing_ok=True)
        row_of: dict[str, int] = {}
        repeats = []  # (row, the first row of its key)
        for row, key in enumerate(keys):
            first = row_of.setdefault(key, row)
            if first != row:
                repeats.append((row, first))
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), dim))
            for chunk_keys, vectors in self._chunks():
                hits = [(i, row_of.pop(key)) for i, key in enumerate(chunk_keys) if key in row_of]  # first chunk wins
                if hits:
                    src, dst = np.array(hits).T
                    out[dst] = vectors[src]
            if row_of:
                raise RuntimeError(
                    f"image {next(iter(row_of)).split(':')[0]}: its embedding left the cache {self.directory} "
                    "while the matrix was filled (a chunk was removed, or found unreadable and dropped); "
                    "run again to recompute it"
                )
            if repeats:
                dst, src = np.array(repeats).T
                out[dst] = out[src]
            out.flush()
            del out
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
            matrix = np.load(tmp, mmap_mode="r")  # mapped before the rename: another run's clean-up cannot remove it
            os.replace(tmp, path)
            matrix.filename = os.path.abspath(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a matrix is as large as the pool's embeddings: leave no partial one
            raise
        return matrix

    def _chunks(self, vectors: bool = True) -> Iterator[tuple[list[str], np.ndarray | None]]:
        """Each readable chunk's keys and (``vectors``) vectors, in file-name order; one that cannot be read
        is dropped with a warning (class docstring), so its embeddings count as missing."""
        for chunk in sorted(self.directory.glob("chunk-*.npz")):
            if not is_regular_file(chunk, follow_symlinks=False):  # a FIFO or /dev/zero would block or fill memory
                warnings.warn(f"embedding cache: {chunk} is not a regular file; ignored (not removed)")
                continue
            try:
                with np.load(chunk, allow_pickle=False) as data:
                    if str(data["key"]) != self.key:
                        raise ValueError(f"written under another cache key ({data['key']}, not {self.key})")
                    keys = data["keys"]
                    found = data["vectors"] if vectors else None
                if keys.ndim != 1 or found is not None and (found.ndim != 2 or len(keys) != len(found)):
                    raise ValueError(f"keys of shape {keys.shape} for vectors of shape {getattr(found, 'shape', None)}")
            except UNREADABLE_NPZ as err:
                warnings.warn(f"embedding cache: dropping unreadable chunk {chunk} ({err}); it will be recomputed")
                chunk.unlink(missing_ok=True)
                continue
            yield keys.tolist(), found

    def append(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not len(keys):
            return
        buffer = io.BytesIO()
        np.savez(buffer, key=np.asarray(self.key), keys=np.asarray(keys, dtype=str),
                 vectors=np.asarray(vectors, dtype=np.float32))
        atomic_write(self.directory / f"chunk-{uuid.uuid4().hex}.npz", buffer.getvalue())


class ChunkWriter:
    """Where embeddings go as they are computed: ``found`` (when given) at once, ``cache`` (when given)
    ``chunk`` keys at a time; leaving the ``with`` block writes the rest, so what was computed survives
    an interruption."""

    def __init__(self, cache: EmbeddingCache | None, chunk: int, found: dict | None):
        self.cache, self.chunk, self.found = cache, chunk, found
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *_) -> None:
        self.flush()

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        if self.found is not None:
            self.found.update(zip(keys, vectors))
        if self.cache is None:
            return
        self.keys += keys
        self.vectors.append(vectors)
        if len(self.keys) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            self.cache.append(self.keys, np.concatenate(self.vectors))
            self.keys, self.vectors = [], []


def key_digest(meta: dict) -> str:
    """A short, stable name for a cache key."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def cache_directory(directory: str | Path, meta: dict) -> Path:
    """``directory``, made, with ``meta.json`` saying which key its files belong to (written once, atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file and a rename: a reader sees all of it or none."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_matrix(path: Path, shape: tuple[int, int]) -> np.memmap | None:
    """The float32 matrix of ``shape`` that ``path`` holds, memory-mapped read-only; None when it is absent or
    anything else (damaged, another shape, not a regular file: a FIFO would block the read), to be rewritten."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except UNREADABLE_NPZ:
        return None
    if matrix.dtype != np.float32 or matrix.shape != shape or not matrix.flags.c_contiguous:
        return None
    return matrix


def image_key(image_id: int, source) -> str:
    """An image's cache key: its id and what identifies its content (encoded bytes: their digest; a file: its
    size, modification and change times). An id alone is not content: another source, or a replaced file, may
    use it for another image, whose negatives would then be mined from the old image's embedding. The change
    time (which no copy, ``touch`` or archive can set back) catches a file replaced by one of the same size
    with its modification time restored (``cp -p``, ``rsync -a``, ``tar x``), without reading every file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{image_id}:{hashlib.sha256(source).hexdigest()[:16]}"
    try:
        status = os.stat(source)
    except OSError:
        return f"{image_id}:unreadable"  # embedding it raises the error that names the image
    return f"{image_id}:{status.st_size}:{status.st_mtime_ns}:{status.st_ctime_ns}"


def text_key(sent_id: int, text: str) -> str:
    """A sentence's cache key: its id and its text's digest."""
    return f"{sent_id}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def missing(keys: list[str], present) -> list[int]:
    """The first position of each key not in ``present``, in order."""
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key not in present:
            first.setdefault(key, index)
    return list(first.values())


def stack(found: dict[str, np.ndarray], keys: list[str], dim: int) -> np.ndarray:
    """The ``(len(keys), dim)`` float32 matrix of ``found``'s vectors, in ``keys``' order."""
    if not keys:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack([found[key] for key in keys]).astype(np.float32, copy=False)
