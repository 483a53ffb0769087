"""The mining embeddings a folder keeps beside its data, so `stats` and `show` can re-check the negatives
(and preview another tau) without the model and without rebuilding.

``embeddings/images.parquet`` (``image_id``, ``embedding``) holds every image the build embedded (each mined
config's pool and its training refs' own images); ``embeddings/<config>.parquet`` (``sent_id``, ``image_id``,
``embedding``) each training sentence of that config, sorted by ``sent_id``. Vectors are the mining model's
L2-normalised embeddings in float16 (half the size; cosines recomputed from them agree with the build's float32
ones to ~1e-3), each stored as its bytes: ``np.frombuffer(cell, "<f2")``.
One model per build: the manifest's ``embeddings`` entry and each config's mining provenance name it.
These files are not part of any `datasets` config: the refs rows stay as small as the schema says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .files import inside

DIRECTORY = "embeddings"
IMAGES_FILE = f"{DIRECTORY}/images.parquet"
DTYPE = "float16"
ROW_GROUP = 4096


@dataclass
class MiningEmbeddings:
    """Image and sentence embeddings of one mining run (rows aligned with the id lists)."""

    image_ids: list[int]
    images: np.ndarray
    sent_ids: list[int]
    sent_image_ids: list[int]
    sentences: np.ndarray

    def __repr__(self) -> str:
        return f"MiningEmbeddings({len(self.image_ids)} images, {len(self.sent_ids)} sentences, dim {self.images.shape[1]})"


def sentences_file(config: str) -> str:
    return f"{DIRECTORY}/{config}.parquet"


def _vectors(vectors: np.ndarray) -> pa.FixedSizeBinaryArray:
    """One ``fixed_size_binary(2 * dim)`` cell per vector: its little-endian float16 bytes. Parquet reads this
    four times faster than a ``fixed_size_list<halffloat>`` (no repetition levels to decode per value)."""
    vectors = np.ascontiguousarray(vectors, dtype="<f2")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * vectors.shape[1]), len(vectors), [None, pa.py_buffer(vectors)])


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP)  # small groups: reading a few ids skips the rest


def write_images(folder: Path, embedded: dict[int, np.ndarray]) -> str:
    """``embeddings/images.parquet`` from image id -> vector; returns its path in the folder."""
    ids = sorted(embedded)
    _write(pa.table({"image_id": pa.array(ids, pa.int64()), "embedding": _vectors(np.stack([embedded[i] for i in ids]))}),
           folder / IMAGES_FILE)
    return IMAGES_FILE


def write_sentences(folder: Path, config: str, embeddings: MiningEmbeddings) -> str:
    """``embeddings/<config>.parquet`` for one config's training sentences; returns its path in the folder."""
    order = np.argsort(embeddings.sent_ids, kind="stable")
    table = pa.table(
        {
            "sent_id": pa.array(np.asarray(embeddings.sent_ids, np.int64)[order]),
            "image_id": pa.array(np.asarray(embeddings.sent_image_ids, np.int64)[order]),
            "embedding": _vectors(np.asarray(embeddings.sentences)[order]),
        }
    )
    _write(table, folder / sentences_file(config))
    return sentences_file(config)


def _read(path: Path, *columns: str, filters=None) -> tuple[list[np.ndarray], np.ndarray]:
    table = pq.read_table(path, filters=filters)
    wrong = [c for c in columns if c not in table.column_names or not pa.types.is_integer(table.schema.field(c).type)]
    if wrong:
        raise ValueError(f"{path}: no integer column(s) {', '.join(wrong)}; not embeddings written by nemo-hf build")
    vectors = table["embedding"].combine_chunks() if "embedding" in table.column_names else None
    if vectors is None or not pa.types.is_fixed_size_binary(vectors.type) or vectors.type.byte_width % 2 or vectors.null_count:
        kind = "no column" if vectors is None else f"{vectors.type}{' with nulls' if vectors.null_count else ''}"
        raise ValueError(f"{path}: 'embedding' is {kind}, not float16 vectors as fixed_size_binary(2 * dim) cells")
    width = vectors.type.byte_width // 2
    matrix = np.frombuffer(vectors.buffers()[1], "<f2", count=len(table) * width, offset=vectors.offset * 2 * width)
    matrix = matrix.reshape(len(table), width).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1) | ~matrix.any(axis=1))
    if bad.size:
        raise ValueError(f"{path}: row {int(bad[0])} ({columns[0]} {table[columns[0]][int(bad[0])].as_py()}): "
                         "an embedding with NaN, inf or all zeros")
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)  # undo float16 rounding of the norm
    return [table[c].to_numpy() for c in columns], matrix


def read(folder: str | Path, config: str, sent_ids: list[int] | None = None) -> MiningEmbeddings | None:
    """The embeddings a folder keeps for ``config`` (float32, unit norm; only ``sent_ids`` when given),
    or None when it keeps none."""
    folder = Path(folder)
    if not os.path.lexists(folder / IMAGES_FILE) or not os.path.lexists(folder / sentences_file(config)):
        return None
    images_path, sentences_path = (inside(folder, name, "mining embeddings") for name in (IMAGES_FILE, sentences_file(config)))
    (image_ids,), images = _read(images_path, "image_id")
    only = None if sent_ids is None else [("sent_id", "in", [int(i) for i in sent_ids])]
    (sent_ids, sent_image_ids), sentences = _read(sentences_path, "sent_id", "image_id", filters=only)
    if images.shape[1] != sentences.shape[1]:
        raise ValueError(f"{folder}: {IMAGES_FILE} holds {images.shape[1]}-d embeddings, {sentences_file(config)} {sentences.shape[1]}-d")
    return MiningEmbeddings(image_ids.tolist(), images, sent_ids.tolist(), sent_image_ids.tolist(), sentences)
