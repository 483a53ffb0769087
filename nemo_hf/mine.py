"""Hard negatives for NeMo mosaics: the search, the false-negative filter, thresholds and provenance.

The rule, per training sentence (the one the official NeMo loader applies to its precomputed lists):

1. rank the pool images, the sentence's own image excluded, by text-to-image (t2i) cosine, best first;
2. drop likely false negatives: mode ``i2i`` drops images whose cosine to the sentence's own image is
   above ``tau``, mode ``t2i`` drops images whose t2i cosine is above ``tau``;
3. keep the first ``top_k`` survivors. When nothing survives over the whole pool, keep the ``top_k``
   least similar images instead (the official loader's "last 300 of the list") and flag the sentence.

Scores are dot products of the float32 embeddings accumulated in float64 and rounded to float32 (the
precision they are stored in), ``tau`` is rounded to float32 too, and ties go to the lower image row:
so the answer does not depend on how the products are blocked. The exact search takes float32
products in blocks with BLAS and recomputes only the pairs whose order or filter decision float32
rounding could change: its result is the rule's, not an approximation of it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nemo_hf import __version__

MODES = ("i2i", "t2i")
INDEXES = ("flat", "ivf", "hnsw")
_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class MiningParams:
    """What decides the negatives; every field goes into the provenance.

    - ``tau``: the false-negative bound. A float is a cosine; a string ``"p99.5"`` is that percentile
      of the similarity the mode filters on (image-image pairs of the pool for ``i2i``,
      sentence-image pairs for ``t2i``), estimated on a seeded sample of ``sample_pairs`` pairs.
    - ``top_k``: how many survivors each sentence keeps (the loader samples 3 of them per epoch).
    - ``mode``: ``"i2i"`` or ``"t2i"``, which similarity ``tau`` bounds.
    - ``index``: ``"flat"`` exact search; ``"ivf"`` or ``"hnsw"`` approximate FAISS indexes for pools
      far larger than COCO (sentences left short by them are finished by the exact search).
    - ``seed``: the percentile sample and the IVF training.

    Defaults: the paper warns that negatives too similar to the target become false negatives and
    too dissimilar ones make the mosaic trivial, and published no values. ``top_k=20`` keeps the
    hardest ~0.1% of a RefCOCO pool (~17k images) while leaving 1,140 distinct triples to sample
    from across epochs; 20 is also where the official loader switches to sampling with replacement.
    ``tau="p99"`` in ``i2i`` mode drops, for a typical target, the ~1% of the pool most similar to
    its image: near-duplicates and same-scene shots, the main source of negatives that also contain
    the referred object, while the t2i ranking still picks hard negatives from the other 99%. A
    percentile rather than a cosine because cosine scales differ between CLIP and SigLIP checkpoints.
    """

    tau: float | str = "p99"
    top_k: int = 20
    mode: str = "i2i"
    index: str = "flat"
    seed: int = 0
    sample_pairs: int = 1_000_000

    def __post_init__(self) -> None:
        if isinstance(self.tau, str):
            match = _PERCENTILE.fullmatch(self.tau)
            if match is None or not 0.0 < float(match.group(1)) <= 100.0:
                raise ValueError(f"tau {self.tau!r}: write a percentile as 'p<q>' with 0 < q <= 100, e.g. 'p99.5'")
        elif isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau {self.tau!r}: give a cosine in [-1, 1] or a percentile string like 'p99'")
        for name, low in (("top_k", 1), ("seed", 0), ("sample_pairs", 100)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value!r}: an integer >= {low} is needed")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.index not in INDEXES:
            raise ValueError(f"index {self.index!r}: one of {', '.join(INDEXES)}")

    @property
    def tau_percentile(self) -> float | None:
        """The percentile asked for, or None when ``tau`` is a cosine."""
        return float(self.tau[1:]) if isinstance(self.tau, str) else None


@dataclass(frozen=True)
class Selection:
    """Per sentence: chosen image rows best first, their t2i cosines, the fallback flag.

    Sentence ``i``'s negatives are ``rows[offsets[i]:offsets[i + 1]]`` (rows of ``image_emb``).
    ``scores`` are float32 cosines, off the exact scores the order was decided on by at most
    ``d * 6e-8`` (3e-5 for 512-d; exact where neighbours were too close to order otherwise).
    ``tau`` is the resolved cosine.
    """

    offsets: np.ndarray
    rows: np.ndarray
    scores: np.ndarray
    fallback: np.ndarray
    tau: float

    def __len__(self) -> int:
        return len(self.fallback)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_fallback(self) -> int:
        return int(self.fallback.sum())

    def negatives(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sentence ``i``'s chosen rows and their scores."""
        span = slice(self.offsets[i], self.offsets[i + 1])
        return self.rows[span], self.scores[span]


def select_negatives(
    text_emb: np.ndarray,
    text_image_row: np.ndarray,
    image_emb: np.ndarray,
    pool_rows: np.ndarray,
    params: MiningParams = MiningParams(),
    threads: int | None = None,
) -> Selection:
    """Apply the NeMo rule (module docstring) to every sentence.

    ``text_emb`` (n, d) and ``image_emb`` (m, d) are L2-normalised; ``text_image_row[i]`` is the row of
    sentence i's own image in ``image_emb``; ``pool_rows`` the rows that may be negatives (a
    sentence's own image is never its own negative, whether or not it is in the pool). ``threads``
    (default: the cores this process may use) run the per-sentence work alongside the BLAS products,
    which use numpy's own BLAS threads; the result does not depend on either.
    """
    text = _unit_rows(text_emb, "text_emb")
    image = _unit_rows(image_emb, "image_emb")
    if text.shape[1] != image.shape[1]:
        raise ValueError(f"text_emb has {text.shape[1]} dims but image_emb {image.shape[1]}")
    own_rows = _rows(text_image_row, len(image), "text_image_row")
    if len(own_rows) != len(text):
        raise ValueError(f"text_image_row has {len(own_rows)} entries for {len(text)} sentences")
    pool = _rows(pool_rows, len(image), "pool_rows")
    sorted_pool = np.unique(pool)
    if len(sorted_pool) != len(pool):
        raise ValueError("pool_rows lists a row more than once")
    if len(sorted_pool) == 0:
        raise ValueError("pool_rows is empty: there is nothing to mine negatives from")
    tau = resolve_tau(params, text, own_rows, image, sorted_pool)
    problem = _Problem(text, own_rows, image, sorted_pool, tau, params)
    result = _Result(len(text), params.top_k)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    exact = _ExactSearch(problem, threads)
    everyone = np.arange(len(text))
    if params.index == "flat":
        exact.run(everyone, result)
    else:
        _IndexSearch(problem, params.index, params.seed).run(everyone, result, exact)
    return result.selection(problem.pool, tau)


def resolve_tau(
    params: MiningParams,
    text_emb: np.ndarray,
    text_image_row: np.ndarray,
    image_emb: np.ndarray,
    pool_rows: np.ndarray,
) -> float:
    """``params.tau`` as a float32 cosine; a percentile is estimated on a seeded grid of ~``sample_pairs`` pairs.

    The grid crosses a sample of anchors (pool images for i2i, sentences for t2i) with a sample of pool
    images, leaving out pairs of an image with itself (i2i) or a sentence with its own image (t2i).
    """
    q = params.tau_percentile
    if q is None:
        return float(np.float32(params.tau))
    rng = np.random.default_rng(params.seed)
    side = math.isqrt(params.sample_pairs - 1) + 1
    candidates = _sample(rng, np.asarray(pool_rows), side)
    if params.mode == "i2i":
        anchors = _sample(rng, np.asarray(pool_rows), side)
        anchor_emb, anchor_image = image_emb[anchors], anchors
    else:
        sentences = _sample(rng, np.arange(len(text_emb)), side)
        anchor_emb, anchor_image = text_emb[sentences], np.asarray(text_image_row)[sentences]
    sims = anchor_emb.astype(np.float64) @ image_emb[candidates].astype(np.float64).T
    values = sims[anchor_image[:, None] != candidates[None, :]]
    if values.size == 0:
        raise ValueError(f"tau {params.tau!r}: the pool has no pair to estimate a percentile from")
    return float(np.float32(np.percentile(values, q)))


class RefNegatives(NamedTuple):
    """One ref's negative columns, aligned with its sentences (schema.REFS_FEATURES)."""

    negatives: list[list[int]]
    scores: list[list[float]]
    fallback: list[bool]


def mine_refs(
    train_refs: Sequence[Mapping],
    image_files: Mapping[int, str | Path | bytes],
    pool_image_ids: Sequence[int],
    embedder,
    params: MiningParams = MiningParams(),
    cache_dir: str | Path | None = None,
) -> tuple[dict[int, RefNegatives], dict]:
    """Mine negatives for one config's training refs.

    ``train_refs``: rows with ``ref_id``, ``image_id``, ``sentences`` [{``sent_id``, ``sent``}].
    ``image_files``: image id -> file path or encoded bytes, for every pool image and every ref's own
    image (own images may lie outside the pool, e.g. google splits). ``embedder``: an
    ``nemo_hf.embed.Embedder``. Returns ref_id -> ``RefNegatives`` (negatives as image ids) and the
    provenance dict for the build manifest: everything the result depends on (model identity,
    embedding dtype and preprocessing, the params, the resolved tau) and its counts.
    """
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
    image_emb = embedder.embed_images([(int(i), image_files[int(i)]) for i in image_ids], cache_dir=cache_dir)
    text_emb = embedder.embed_texts(list(zip(sent_ids, texts)), cache_dir=cache_dir)
    text_image_row = np.searchsorted(image_ids, own_image_ids)
    pool_rows = np.searchsorted(image_ids, pool_ids)
    selection = select_negatives(text_emb, text_image_row, image_emb, pool_rows, params)

    columns: dict[int, RefNegatives] = {}
    i = 0
    for ref in train_refs:
        negatives, scores, fallback = [], [], []
        for _ in ref["sentences"]:
            rows, row_scores = selection.negatives(i)
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
        "sentences": len(sent_ids),
        "fallback_sentences": selection.n_fallback,
    }
    return columns, provenance


def _unit_rows(emb: np.ndarray, name: str) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) matrix, got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= 1e-3))
    if bad.size:
        raise ValueError(f"{name} row {bad[0]} has norm {norms[bad[0]]:.4g}: embeddings must be L2-normalised")
    return emb


def _rows(rows: np.ndarray, n: int, name: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) and rows.size:
        raise ValueError(f"{name} must be a 1-d array of integer rows")
    rows = rows.astype(np.int64)
    outside = np.flatnonzero((rows < 0) | (rows >= n))
    if outside.size:
        raise ValueError(f"{name}[{outside[0]}] = {rows[outside[0]]} is not a row of image_emb ({n} rows)")
    return rows


def _sample(rng: np.random.Generator, population: np.ndarray, size: int) -> np.ndarray:
    if len(population) <= size:
        return population
    return np.sort(rng.choice(population, size=size, replace=False))


def _float_order(scores: np.ndarray) -> np.ndarray:
    """int64 keys in [-2**31, 2**31) ordered as the float32 ``scores`` (-0 and +0 equal)."""
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _best_first(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Argsort along the last axis by float32 score descending, then row ascending (rows < 2**31)."""
    return np.argsort((-_float_order(scores) << 32) | rows, axis=-1)


def _exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products accumulated in float64, rounded to float32: the scores decisions use."""
    return np.einsum("ij,ij->i", a, b, dtype=np.float64).astype(np.float32)


class _Problem:
    """One selection's arrays, indexed the way the searches need them."""

    def __init__(self, text, own_rows, image, pool, tau: float, params: MiningParams):
        self.text, self.own_rows, self.image, self.tau = text, own_rows, image, tau
        self.k, self.mode = params.top_k, params.mode
        # Pool positions in a fixed random order, so any run of columns is a uniform sample of the
        # pool (the searches' bounds rely on it for speed only); ties go by row, `self.pool[position]`.
        self.pool = np.random.default_rng(0).permutation(pool)
        self.pool_emb = np.ascontiguousarray(image[self.pool])
        position = np.full(len(image), -1, dtype=np.int64)
        position[self.pool] = np.arange(len(pool))
        self.own_pos = position[own_rows]
        # Bound on |float32 BLAS dot - exact score| for unit vectors: d roundings of at most 2**-24 each
        # (room for norms up to 1 + 1e-3, what _unit_rows accepts) plus the final rounding to float32.
        self.eps = 1.01 * text.shape[1] * 2.0**-24 + 2.0**-23
        # float32 similarities at or above `low` may be above tau; above `high` they surely are.
        self.low = np.nextafter(np.float32(tau - self.eps), np.float32(-np.inf))
        self.high = np.nextafter(np.float32(tau + self.eps), np.float32(np.inf))

    def t2i(self, sent: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return _exact(self.text[sent], self.pool_emb[pos])

    def excluded(self, sent: np.ndarray, pos: np.ndarray, fast: np.ndarray) -> np.ndarray:
        """Which (sentence, pool position) pairs the filter drops, from float32 ``fast`` similarities.

        Only pairs within rounding distance of tau are recomputed exactly.
        """
        out = fast > self.high
        unsure = np.flatnonzero((fast >= self.low) & ~out)
        if unsure.size:
            if self.mode == "i2i":
                exact = _exact(self.image[self.own_rows[sent[unsure]]], self.pool_emb[pos[unsure]])
            else:
                exact = self.t2i(sent[unsure], pos[unsure])
            out[unsure] = exact > self.tau
        return out


class _Result:
    """Chosen pool positions per sentence, filled in any order."""

    def __init__(self, n: int, k: int):
        self.pos = np.full((n, k), -1, dtype=np.int64)
        self.scores = np.zeros((n, k), dtype=np.float32)
        self.count = np.full(n, -1, dtype=np.int64)
        self.fallback = np.zeros(n, dtype=bool)

    def set(self, sent: np.ndarray, pos: np.ndarray, scores: np.ndarray, count: np.ndarray, fallback=False):
        k = pos.shape[1]
        self.pos[sent, :k] = np.where(np.arange(k) < count[:, None], pos, -1)
        self.scores[sent, :k] = np.where(np.arange(k) < count[:, None], scores, 0.0)
        self.count[sent] = count
        self.fallback[sent] = fallback

    def selection(self, pool: np.ndarray, tau: float) -> Selection:
        assert (self.count >= 0).all(), "a sentence was left without a decision"
        taken = np.arange(self.pos.shape[1]) < self.count[:, None]
        offsets = np.concatenate([[0], np.cumsum(self.count)]).astype(np.int64)
        return Selection(offsets, pool[self.pos[taken]], self.scores[taken], self.fallback.copy(), tau)


class _ExactSearch:
    """The rule over the whole pool, in blocks of sentences.

    Per block: one float32 product with the pool (the cost floor; plus, for i2i, one with the block's
    own images). Per sentence, a bound from a sample of columns (``_bound``); only candidates above it
    are filtered and ranked (``_rank``). A sentence the bound leaves short is redone with the bound it
    turned out to need, or a safe one, and at worst over its full row. The per-sentence work runs in
    ``threads`` row slices while the next block's products are computed.
    """

    def __init__(self, problem: _Problem, threads: int, block_bytes: int = 128 << 20, subset: int = 1024):
        self.pb, self.threads, self.subset = problem, threads, subset
        self.margin = 8  # the safe bound leaves top_k + margin survivors above it
        self.block_rows = int(np.clip(block_bytes // (4 * len(problem.pool)), 16, 4096))

    def __repr__(self) -> str:
        return f"_ExactSearch(pool={len(self.pb.pool)}, block_rows={self.block_rows}, threads={self.threads})"

    def run(self, sentences: np.ndarray, result: _Result) -> None:
        # Sentences of the same image together, so a block needs few image-image rows.
        order = sentences[np.argsort(self.pb.own_rows[sentences], kind="stable")]
        # Products land in buffers reused across blocks: fresh 100 MB arrays would cost page faults.
        # Two sets, so the next block's products run while this block's sentences are decided.
        shape = (min(self.block_rows, len(order)), len(self.pb.pool))
        buffers = [[np.empty(shape, np.float32) for _ in range(1 + (self.pb.mode == "i2i"))] for _ in range(2)]
        pending: list = []
        with ThreadPoolExecutor(self.threads) as workers:
            for number, start in enumerate(range(0, len(order), self.block_rows)):
                started = self._block(order[start : start + self.block_rows], result, workers, buffers[number % 2])
                for done in pending:
                    done.result()
                pending = started
            for done in pending:
                done.result()

    def _block(self, sent: np.ndarray, result: _Result, workers: ThreadPoolExecutor, buffers: list) -> list:
        """One BLAS product for the block; returns the futures deciding its sentences, a row slice each."""
        pb = self.pb
        scores = np.matmul(pb.text[sent], pb.pool_emb.T, out=buffers[0][: len(sent)])
        own = pb.own_pos[sent]
        in_pool = np.flatnonzero(own >= 0)
        scores[in_pool, own[in_pool]] = -np.inf  # never a sentence's own negative
        own_sim, own_index = None, np.zeros(len(sent), dtype=np.int64)
        if pb.mode == "i2i":
            own_images, own_index = np.unique(pb.own_rows[sent], return_inverse=True)
            own_sim = np.matmul(pb.image[own_images], pb.pool_emb.T, out=buffers[1][: len(own_images)])
        edges = np.linspace(0, len(sent), self.threads + 1).astype(int)
        slices = [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        return [
            workers.submit(self._decide, sent[part], scores[part], own_sim, own_index[part], result)
            for part in slices
        ]

    def _decide(self, sent, scores, own_sim, own_index, result: _Result) -> None:
        bound = self._bound(scores, own_sim, own_index, tight=True)
        left, needed = self._rank(sent, scores, own_sim, own_index, bound, result)
        for _ in range(2):  # lower bounds for the sentences left: the one they need, else a safe one
            if not left.size:
                return
            scores_left, index_left = scores[left], own_index[left]
            unknown = np.flatnonzero(np.isnan(needed))
            needed[unknown] = self._bound(scores_left[unknown], own_sim, index_left[unknown], tight=False)
            undecided, needed = self._rank(sent[left], scores_left, own_sim, index_left, needed, result)
            left = left[undecided]
        rows = int(np.clip(2**22 // scores.shape[1], 1, 64))  # full rows at a time: ~4M candidates
        for start in range(0, len(left), rows):
            part = left[start : start + rows]
            undecided, _ = self._rank(sent[part], scores[part], own_sim, own_index[part], None, result)
            assert undecided.size == 0, "a full-row pass cannot leave a sentence undecided"

    def _bound(self, scores, own_sim, own_index, tight: bool) -> np.ndarray:
        """Per sentence, a score its survivors are counted above (+inf: none known).

        Taken on the first pool columns (a random sample), leaving out what the filter may drop.
        ``tight``: the least of three slice maxima, each slice ~pool / (2 top_k) wide, so about
        3 top_k survivors lie above it. Otherwise the (top_k + margin)-th best of the sample: at
        least that many survivors lie above it.
        """
        pb = self.pb
        n_rows, n_pool = scores.shape
        need = pb.k + self.margin
        if tight:
            width = min(n_pool // 3, math.ceil(n_pool / (2 * pb.k)))
            cols = 3 * width
        else:
            cols = min(n_pool, max(self.subset, 4 * need))
        if (tight and width == 0) or (not tight and cols <= need):
            return np.full(n_rows, np.inf, dtype=np.float32)
        sub = scores[:, :cols].copy()
        sub[(own_sim[:, :cols] >= pb.low)[own_index] if pb.mode == "i2i" else sub >= pb.low] = -np.inf
        if tight:
            bound = sub.reshape(n_rows, 3, width).max(axis=2).min(axis=1)
        else:
            bound = np.partition(sub, cols - need, axis=1)[:, cols - need]
        bound[np.isneginf(bound)] = np.inf
        return bound

    def _rank(self, sent, scores, own_sim, own_index, bound, result: _Result) -> tuple[np.ndarray, np.ndarray]:
        """Decide the sentences whose candidates (score >= bound) settle the rule.

        Returns the undecided sentences (indices into ``sent``) and the bound each needs (NaN when it
        has too few survivors to tell). ``bound=None`` takes every pool image as a candidate (the
        full-row pass), which decides all. Own images hold -inf in ``scores`` and pass no bound.

        The float32 scores may misorder two survivors less than ``2 eps`` apart. So with ``v`` the
        top_k-th best float32 score, survivors from ``v - 2 eps`` up form the zone that may hold the
        top_k, and survivors in the zone with a neighbour that close are ranked by exact scores.
        """
        pb, k, gap = self.pb, self.pb.k, 2 * self.pb.eps
        n_rows, n_pool = scores.shape
        full = bound is None
        if full:
            bound = np.full(n_rows, np.finfo(np.float32).min, dtype=np.float32)
        candidate = scores >= bound[:, None]
        if pb.mode == "t2i":
            candidate &= scores <= pb.high  # above it the filter surely drops them
        flat = np.flatnonzero(candidate)
        r, c = np.divmod(flat, n_pool)
        fast = own_sim.ravel()[own_index[r] * n_pool + c] if pb.mode == "i2i" else scores.ravel()[flat]
        keep = ~pb.excluded(sent[r], c, fast)
        r, c = r[keep], c[keep]
        s = scores.ravel()[flat[keep]]
        n = np.bincount(r, minlength=n_rows)
        if full and (n == 0).any():
            self._fallback(sent[n == 0], result)

        order = np.argsort((r << 32) | (2**31 - 1 - _float_order(s)), kind="stable")  # by row, then score down
        r, c, s = r[order], c[order], s[order]
        start = np.cumsum(n) - n
        kth = np.full(n_rows, -np.inf)
        enough = np.flatnonzero(n >= k)
        kth[enough] = s[start[enough] + k - 1]
        floor = kth - gap
        needed = np.full(n_rows, np.nan, dtype=np.float32)
        needed[enough] = np.nextafter(floor[enough].astype(np.float32), np.float32(-np.inf))
        redo = np.zeros(n_rows, dtype=bool) if full else (n < k) | (bound > floor)

        zone = (s >= floor[r]) & ~redo[r]
        r, c, s = r[zone], c[zone], s[zone]
        close = (r[1:] == r[:-1]) & (s[:-1].astype(np.float64) - s[1:] <= gap)
        chained = np.zeros(len(s), dtype=bool)
        chained[1:] |= close
        chained[:-1] |= close
        exact = s.copy()
        at = np.flatnonzero(chained)
        if at.size:  # exact scores for chained survivors, re-ordered within their runs
            exact[at] = pb.t2i(sent[r[at]], c[at])
            run = np.cumsum(np.concatenate([[True], ~close]))[at]
            at_sorted = at[np.lexsort((pb.pool[c[at]], -exact[at], run))]
            c[at], exact[at] = c[at_sorted], exact[at_sorted]
        in_zone = np.bincount(r, minlength=n_rows)
        rank = np.arange(len(r)) - (np.cumsum(in_zone) - in_zone)[r]
        top = rank < k
        decided = np.flatnonzero((n > 0) & ~redo)
        slot = np.zeros(n_rows, dtype=np.int64)
        slot[decided] = np.arange(len(decided))
        pos = np.full((len(decided), k), -1, dtype=np.int64)
        value = np.zeros((len(decided), k), dtype=np.float32)
        pos[slot[r[top]], rank[top]], value[slot[r[top]], rank[top]] = c[top], exact[top]
        result.set(sent[decided], pos, value, np.minimum(n[decided], k))
        left = np.flatnonzero(redo)
        return left, needed[left]

    def _fallback(self, sent: np.ndarray, result: _Result) -> None:
        """Nothing survives for these sentences: the top_k last of their full ranked lists."""
        pb, k = self.pb, self.pb.k
        columns = 2**16
        for i in sent:
            text = pb.text[i].astype(np.float64)
            exact = np.concatenate(
                [
                    (pb.pool_emb[start : start + columns].astype(np.float64) @ text).astype(np.float32)
                    for start in range(0, len(pb.pool), columns)
                ]
            )
            pos = np.arange(len(pb.pool))
            if pb.own_pos[i] >= 0:
                exact, pos = np.delete(exact, pb.own_pos[i]), np.delete(pos, pb.own_pos[i])
            ranked = _best_first(exact, pb.pool[pos])[-k:]
            count = np.array([len(ranked)])
            result.set(np.array([i]), pos[ranked][None], exact[ranked][None], count, fallback=True)


class _IndexSearch:
    """Approximate top-M search with a FAISS index, filtered, widened for short sentences.

    A sentence short of top_k survivors at ``max_depth`` goes to the exact search, so fallbacks are
    still exact: only the ranking of the found survivors is approximate.
    """

    def __init__(self, problem: _Problem, kind: str, seed: int, max_depth: int = 4096, gather_bytes: int = 2**26):
        import faiss

        self.pb, self.kind, self.gather_bytes = problem, kind, gather_bytes
        n, d = problem.pool_emb.shape
        self.max_depth = min(n, max_depth)
        if kind == "ivf":
            nlist = int(np.clip(4 * math.sqrt(n), 1, max(1, n // 39)))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            self.index.train(problem.pool_emb)
            self.index.nprobe = min(nlist, max(32, nlist // 8))
        else:
            self.index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = 80
        self.index.add(problem.pool_emb)

    def __repr__(self) -> str:
        return f"_IndexSearch(kind={self.kind!r}, pool={len(self.pb.pool)}, max_depth={self.max_depth})"

    def run(self, sentences: np.ndarray, result: _Result, exact: _ExactSearch) -> None:
        depth = min(self.max_depth, 4 * self.pb.k + 16)
        todo = sentences
        while todo.size:
            # i2i gathers depth pool vectors per sentence: batches sized to bound that memory.
            batch = max(1, self.gather_bytes // (depth * 4 * self.pb.pool_emb.shape[1]))
            short = np.concatenate(
                [self._search(todo[s : s + batch], depth, result) for s in range(0, len(todo), batch)]
            )
            if depth >= self.max_depth:
                exact.run(short, result)
                return
            todo, depth = short, min(self.max_depth, 4 * depth)

    def _search(self, sent: np.ndarray, depth: int, result: _Result) -> np.ndarray:
        pb, k = self.pb, self.pb.k
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(64, 2 * depth)
        score, pos = self.index.search(pb.text[sent], depth)
        valid = (pos >= 0) & (pos != pb.own_pos[sent][:, None])
        r, c = np.nonzero(valid)
        fast = score[r, c]
        if pb.mode == "i2i":
            fast = np.einsum("ij,ij->i", pb.image[pb.own_rows[sent[r]]], pb.pool_emb[pos[r, c]])
        dropped = pb.excluded(sent[r], pos[r, c], fast)
        valid[r[dropped], c[dropped]] = False
        score = np.where(valid, score, -np.inf)
        order = _best_first(score, pb.pool[pos])
        score, pos = np.take_along_axis(score, order, 1), np.take_along_axis(pos, order, 1)
        n = valid.sum(axis=1)
        done = n >= k
        result.set(sent[done], pos[done, :k], score[done, :k], np.full(int(done.sum()), k))
        return sent[~done]
