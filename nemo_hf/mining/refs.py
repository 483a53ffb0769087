"""Mining a config's refs: their sentences and images embedded, the negatives selected
(``negatives.select_negatives``), and the result as dataset columns with its provenance."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import __version__
from .negatives import MiningParams, select_negatives

_LOG = logging.getLogger(__name__)


class RefNegatives(NamedTuple):
    """One ref's negative columns, aligned with its sentences (schema.REFS_FEATURES)."""

    negatives: list[list[int]]
    scores: list[list[float]]
    fallback: list[bool]


class _MiningInputs(NamedTuple):
    """What a config's mining embeds: its training sentences and the images they and the pool need."""

    sent_ids: list[int]
    texts: list[str]
    own_image_ids: list[int]
    pool_ids: np.ndarray
    image_ids: np.ndarray  # sorted: the pool and every sentence's own image

    @classmethod
    def of(cls, train_refs, image_files, pool_image_ids) -> _MiningInputs:
        ref_ids: set[int] = set()
        sent_ids: list[int] = []
        texts: list[str] = []
        own_image_ids: list[int] = []
        for ref in train_refs:
            ref_id = int(ref["ref_id"])
            if ref_id in ref_ids:
                raise ValueError(f"ref {ref_id} appears twice in train_refs")
            ref_ids.add(ref_id)
            if not ref["sentences"]:
                raise ValueError(f"ref {ref_id} has no sentences")
            for sentence in ref["sentences"]:
                sent_ids.append(int(sentence["sent_id"]))
                texts.append(str(sentence["sent"]))
                own_image_ids.append(int(ref["image_id"]))
        if not sent_ids:
            raise ValueError("train_refs is empty: there is nothing to mine")
        pool_ids = np.unique(np.asarray(pool_image_ids, dtype=np.int64))
        image_ids = np.unique(np.concatenate([pool_ids, np.asarray(own_image_ids, dtype=np.int64)]))
        missing = [int(i) for i in image_ids if int(i) not in image_files]
        if missing:
            raise KeyError(f"image_files lacks {len(missing)} image(s) needed for mining, e.g. image id {missing[0]}")
        return cls(sent_ids, texts, own_image_ids, pool_ids, image_ids)

    def images(self, image_files) -> list[tuple[int, str | Path | bytes]]:
        return [(int(i), image_files[int(i)]) for i in self.image_ids]

    def sentences(self) -> list[tuple[int, str]]:
        return list(zip(self.sent_ids, self.texts))


def mine_refs(
    train_refs: Sequence[Mapping],
    image_files: Mapping[int, str | Path | bytes],
    pool_image_ids: Sequence[int],
    embedder,
    params: MiningParams = MiningParams(),
    cache_dir: str | Path | None = None,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
) -> tuple[dict[int, RefNegatives], dict]:
    """Mine negatives for one config's training refs.

    ``train_refs``: rows with ``ref_id``, ``image_id``, ``sentences`` [{``sent_id``, ``sent``}].
    ``image_files``: image id -> file path or encoded bytes, for every pool image and every ref's own
    image (own images may lie outside the pool, e.g. google splits). ``embedder``: an
    ``nemo_hf.mining.embed.Embedder``. ``cache_dir``: its embedding cache; with an approximate ``params.index``
    the image embeddings are memory-mapped from a matrix file there. ``image_sizes``: image id -> the
    (width, height) its rows were made for; an image that decodes to another size is an error. Returns ref_id -> ``RefNegatives``
    (negatives as image ids) and the provenance dict for the build manifest: everything the result
    depends on (model identity, embedding dtype and preprocessing, the params, the resolved tau) and
    its counts.
    """
    inputs = _MiningInputs.of(train_refs, image_files, pool_image_ids)
    image_ids, pool_ids = inputs.image_ids, inputs.pool_ids
    # An approximate index reads the pool from a memory-mapped file (millions of images need not fit in RAM);
    # the exact search scores every image against every sentence, so it holds them in RAM anyway.
    memory_map = params.index != "flat" and cache_dir is not None
    image_emb = embedder.embed_images(
        inputs.images(image_files), cache_dir=cache_dir, memory_map=memory_map, sizes=image_sizes
    )
    text_emb = embedder.embed_texts(inputs.sentences(), cache_dir=cache_dir)
    text_image_row = np.searchsorted(image_ids, inputs.own_image_ids)
    pool_rows = np.searchsorted(image_ids, pool_ids)
    selection = select_negatives(text_emb, text_image_row, image_emb, pool_rows, params)

    columns: dict[int, RefNegatives] = {}
    kept = np.zeros(len(inputs.sent_ids), dtype=np.int64)
    i = 0
    for ref in train_refs:
        negatives, scores, fallback = [], [], []
        for _ in ref["sentences"]:
            rows, row_scores = selection.negatives(i)
            kept[i] = len(rows)
            negatives.append(image_ids[rows].tolist())
            scores.append(row_scores.tolist())
            fallback.append(bool(selection.fallback[i]))
            i += 1
        columns[int(ref["ref_id"])] = RefNegatives(negatives, scores, fallback)
    image_key, text_key = embedder.cache_key("image"), embedder.cache_key("text")
    provenance = {
        "nemo_hf_version": __version__,
        "model": embedder.identity.as_dict(),
        "embedding_dtype": image_key["dtype"],
        "image_preprocessing_sha256": image_key["preprocessing_sha256"],
        "text_preprocessing_sha256": text_key["preprocessing_sha256"],
        **asdict(params),
        "tau_cosine": selection.tau,
        "pool_size": len(pool_ids),
        "sentences": len(inputs.sent_ids),
        "fallback_sentences": selection.n_fallback,
    }
    note = shortfall_note(kept, params.top_k, len(pool_ids), selection.tau)
    if note:
        _LOG.warning(note)
    return columns, provenance


def shortfall_note(kept: np.ndarray, top_k: int, pool_size: int, tau_cosine: float) -> str | None:
    """One line saying why sentences keep fewer than ``top_k`` negatives (``kept``: the count of each), with
    the numbers, or None when every sentence has ``top_k``. The candidates of a sentence are the pool (the
    source's training images, less every image that is val/test in any config) less its own image."""
    kept = np.asarray(kept)
    short = int((kept < top_k).sum())
    if not short:
        return None
    counts = f"{int(kept.min())}" if kept.min() == kept[kept < top_k].max() else f"{int(kept.min())} to {int(kept[kept < top_k].max())}"
    head = f"{short} of {len(kept)} training sentences keep fewer than top_k={top_k} negatives ({counts})"
    if pool_size - 1 < top_k:
        return (f"{head}: --top-k {top_k} is larger than the pool, {pool_size} training images (the source's "
                "training images less every val/test image of any config) less each sentence's own image")
    return (f"{head}: tau (cosine {tau_cosine:.3f}) leaves fewer than {top_k} of the pool's {pool_size} images "
            "for them (a higher tau, a smaller --top-k or a larger source keeps more)")


def embed_share(
    train_refs: Sequence[Mapping],
    image_files: Mapping[int, str | Path | bytes],
    pool_image_ids: Sequence[int],
    embedder,
    cache_dir: str | Path,
    ranks,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
) -> dict[str, int]:
    """Under several processes: this rank's share of the embeddings ``mine_refs`` will need, computed
    into the shared ``cache_dir`` (``Embedder.embed_share``); ``mine_refs`` on rank 0 then reads them all."""
    inputs = _MiningInputs.of(train_refs, image_files, pool_image_ids)
    return embedder.embed_share(inputs.images(image_files), inputs.sentences(), cache_dir, ranks, image_sizes)
