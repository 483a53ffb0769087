"""Hard negatives for NeMo mosaics: the search, the false-negative filter and its threshold.

The rule, per training sentence (the one the official NeMo loader applies to its precomputed lists):

1. rank the pool images, the sentence's own image excluded, by text-to-image (t2i) cosine, best first;
2. drop likely false negatives: mode ``i2i`` drops images whose cosine to the sentence's own image is
   above ``tau``, mode ``t2i`` drops images whose t2i cosine is above ``tau``;
3. keep the first ``top_k`` survivors. When nothing survives over the whole pool, keep the ``top_k``
   least similar images instead (the official loader's "last 300 of the list") and flag the sentence.

Exact search is the default: each sentence's scores against the whole pool are computed in blocks
(one BLAS product, the cost floor of any exact search), the filter sets what it drops to -inf, and
FAISS's heap selection (``faiss.kmax``) takes the first ``top_k`` of what is left. FAISS's own
``IndexFlatIP.search`` cannot do this: its ID filter is one set per call, not one per sentence, so it
would need lists deep enough to outlast the filter, and a sentence deep in a cluster of its image's
near-duplicates needs hundreds. (i2i with an approximate index groups sentences by own image, which
gives one ID filter per call: see ``_RuleSearch``.) IVF, IVF-PQ and HNSW indexes (module ``index``) are
options for pools far larger than COCO (t2i ones on the GPUs when faiss-gpu sees any): their top lists
are re-scored exactly and filtered here, and the few sentences they leave short get the exact
treatment. The image embeddings may be a memory map (``select_negatives``).
Scores are float32 dot products and ties go to the lower image row, so the result equals the rule
computed in any other way up to the order of candidates whose cosines agree within float32 rounding.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from .index import approximate_index, is_cpu, list_depth, selector_parameters, set_depth
from .pool import PoolVectors, sample, unit_rows

MODES = ("i2i", "t2i")
INDEXES = ("flat", "ivf", "ivfpq", "hnsw")
_PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningParams:
    """What decides the negatives; every field goes into the provenance.

    - ``tau``: the false-negative bound. A float is a cosine; a string ``"p99.5"`` is that percentile
      of the similarity the mode filters on (image-image pairs of the pool for ``i2i``,
      sentence-image pairs for ``t2i``), estimated on a seeded sample of ``sample_pairs`` pairs.
    - ``top_k``: how many survivors each sentence keeps (the loader samples 3 of them per epoch).
    - ``mode``: ``"i2i"`` or ``"t2i"``, which similarity ``tau`` bounds.
    - ``index``: ``"flat"`` exact search over every pool image (module docstring); ``"ivf"``,
      ``"ivfpq"`` (product-quantised codes: ~64 bytes an image for 512 dims instead of 2 KB) or
      ``"hnsw"`` approximate FAISS indexes for pools far larger than COCO (sentences left short by them
      are finished on their exact whole-pool scores, so fallbacks stay exact).
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
    ``scores`` are the float32 cosines the order was decided on; ``tau`` is the resolved cosine.
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
    index: faiss.Index | None = None,
) -> Selection:
    """Apply the NeMo rule (module docstring) to every sentence.

    ``text_emb`` (n, d) and ``image_emb`` (m, d) are L2-normalised; ``image_emb`` may be a float16 or
    float32 ``np.memmap`` (``np.load(path, mmap_mode="r")``) of a pool too large for RAM: it is then
    read in blocks and gathered by rows, never whole. ``text_image_row[i]`` is the row of
    sentence i's own image in ``image_emb``; ``pool_rows`` the rows that may be negatives (a
    sentence's own image is never its own negative, whether or not it is in the pool). ``threads``
    (default: the cores this process may use) is how many blocks of exact scores are worked on at
    once, each on one BLAS and one FAISS thread (cache-sized blocks, no thread hand-offs inside a
    block), and FAISS's OpenMP thread count for an approximate index. ``index``: a FAISS index of
    the kind ``params.index`` names, already built over ``image_emb[np.sort(pool_rows)]`` in that
    order (building one over millions of images takes minutes: build once, e.g. ``faiss.read_index``);
    built here when None.
    """
    text = unit_rows(text_emb, "text_emb")
    image = unit_rows(image_emb, "image_emb", in_ram=False)
    if text.shape[1] != image.shape[1]:
        raise ValueError(f"text_emb has {text.shape[1]} dims but image_emb {image.shape[1]}")
    own_rows = _rows(text_image_row, len(image), "text_image_row")
    if len(own_rows) != len(text):
        raise ValueError(f"text_image_row has {len(own_rows)} entries for {len(text)} sentences")
    pool = _rows(pool_rows, len(image), "pool_rows")
    sorted_pool = np.unique(pool)
    if len(sorted_pool) != len(pool):
        raise ValueError("pool_rows lists a row more than once")
    if len(sorted_pool) == 0:  # a tiny source: every sentence keeps none, which the build explains
        empty = np.zeros(0, dtype=np.int64)
        return Selection(np.zeros(len(text) + 1, np.int64), empty, empty.astype(np.float32), np.zeros(len(text), bool), 1.0)
    tau = resolve_tau(params, text, own_rows, image, sorted_pool)
    rule = _RuleSearch(text, own_rows, image, sorted_pool, tau, params)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    previous_threads = faiss.omp_get_max_threads()
    try:
        sentences = np.arange(len(text))
        if params.index != "flat":
            faiss.omp_set_num_threads(threads)
            if index is None:
                start = time.perf_counter()
                index = approximate_index(rule.pool_vectors, params.index, params.mode, params.seed)
                _LOG.info("%s over %d images built in %.1f s", type(index).__name__, index.ntotal, time.perf_counter() - start)
            elif (index.ntotal, index.d) != (len(sorted_pool), image.shape[1]):
                raise ValueError(
                    f"index holds {index.ntotal} vectors of {index.d} dims; the pool {len(sorted_pool)} of {image.shape[1]}"
                )
            sentences = rule.search(index, sentences, threads)
        faiss.omp_set_num_threads(1)
        rule.whole_pool(sentences, threads)
    finally:
        faiss.omp_set_num_threads(previous_threads)
    return rule.selection()


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
    candidates = sample(rng, np.asarray(pool_rows), side)
    if params.mode == "i2i":
        anchors = sample(rng, np.asarray(pool_rows), side)
        anchor_emb, anchor_image = image_emb[anchors], anchors
    else:
        sentences = sample(rng, np.arange(len(text_emb)), side)
        anchor_emb, anchor_image = text_emb[sentences], np.asarray(text_image_row)[sentences]
    sims = anchor_emb.astype(np.float64) @ image_emb[candidates].astype(np.float64).T
    values = sims[anchor_image[:, None] != candidates[None, :]]
    if values.size == 0:  # one pool image and its own anchors: no pair to estimate from, and nothing to drop
        return 1.0
    return float(np.float32(np.percentile(values, q)))


def build_index(image_emb: np.ndarray, pool_rows: np.ndarray, params: MiningParams) -> faiss.Index:
    """The approximate FAISS index ``select_negatives`` would build for ``params.index`` over
    ``image_emb[np.sort(pool_rows)]``: build it once and pass it as ``index=`` (or keep it with
    ``faiss.write_index``) to mine many sentence sets. ``image_emb`` may be memory-mapped (float16 or
    float32): it is read in blocks."""
    if params.index == "flat":
        raise ValueError("index 'flat' is the exact search: it has no FAISS index to build")
    image = unit_rows(image_emb, "image_emb", in_ram=False)
    pool = np.unique(_rows(pool_rows, len(image), "pool_rows"))
    return approximate_index(PoolVectors(image, pool), params.index, params.mode, params.seed)


def _rows(rows: np.ndarray, n: int, name: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) and rows.size:
        raise ValueError(f"{name} must be a 1-d array of integer rows")
    rows = rows.astype(np.int64)
    outside = np.flatnonzero((rows < 0) | (rows >= n))
    if outside.size:
        raise ValueError(f"{name}[{outside[0]}] = {rows[outside[0]]} is not a row of image_emb ({n} rows)")
    return rows


def _float32(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def _dropped_share(params: MiningParams, tau: float, text, own_rows, image, pool) -> float:
    """The share of the pool the filter drops for a typical sentence: 1 - q/100 for a percentile tau,
    else estimated on a seeded sample of 256 anchors x 4096 pool images."""
    q = params.tau_percentile
    if q is not None:
        return 1.0 - q / 100.0
    rng = np.random.default_rng(params.seed)
    if params.mode == "i2i":
        anchors = _float32(image[sample(rng, np.unique(own_rows), 256)])
    else:
        anchors = text[sample(rng, np.arange(len(text)), 256)]
    return float(np.mean(anchors @ _float32(image[sample(rng, pool, 4096)]).T > tau))


class _RuleSearch:
    """The rule on whole-pool score rows (exact), or on an approximate index's top lists.

    i2i on a CPU index: the filter depends only on the sentence's own image, so each own image's
    drops are found first (a range search of the index at ``tau``, re-scored exactly; a drop whose PQ
    code under-rates it is left to the exact re-filter below), and its sentences' lists are searched
    with those images excluded (a FAISS ID selector): lists then need only ``top_k`` survivors' depth,
    whatever share of the pool the filter drops. Lists are ``first_depth`` long, then ``widen`` times that
    for those left short. IVF-PQ's are re-scored exactly and longer, since its codes order a list only
    roughly, the more so the denser the pool: about 2.5% of the pool, from 16 to ``pq_depth`` times
    ``first_depth`` (recall@20 on a clustered 10M pool: 0.77 at 32x, 0.85 at 64x, 0.92 at 128x, 0.96 at
    256x for 11% more time than 64x; twice the probes gave 0.85. At 20k, 256x is the whole pool: 65x
    the exact search's time).

    t2i, and GPU indexes (no range search or selectors there; one passed in): lists are ``first_depth`` long, then
    ``widen * first_depth`` or ``top_k`` plus twice what the filter drops from a typical sentence's
    pool, if more (``tau="p99"`` drops 1% of the pool: 10k of a 1M pool); IVF-PQ searches once at four
    times that depth (a shallow list would hold survivors only by the codes' error and be accepted with
    the wrong negatives).

    Every list is re-filtered exactly, so a drop the index missed is still dropped; sentences still
    short get their whole score row, which also settles the fallback. Lists are searched
    ``batch_entries`` (sentence, candidate) pairs at a time, score rows ``block_bytes`` of float32 at
    a time per thread, and at least ``min_rows`` (every block reads the whole pool: with fewer rows the
    product waits on memory, 2.2x slower at 1M images). The i2i filter is computed along a list only as
    far as it takes to find ``top_k`` survivors.
    """

    widen, pq_depth, batch_entries, block_bytes, min_rows = 8, 256, 2**20, 2**26, 64

    def __init__(self, text, own_rows, image, pool, tau: float, params: MiningParams):
        self.text, self.own_rows, self.image, self.pool, self.tau = text, own_rows, image, pool, tau
        self.k, self.mode = params.top_k, params.mode
        self.first_depth = 4 * self.k + 16
        self.rescore = params.index == "ivfpq"  # PQ scores are approximate (GPU ones too: see search)
        self.dropped_share = 0.0 if params.index == "flat" else _dropped_share(params, tau, text, own_rows, image, pool)
        self.pool_vectors = PoolVectors(image, pool)  # pool: sorted
        position = np.full(len(image), -1, dtype=np.int64)
        position[pool] = np.arange(len(pool))
        self.own_pos = position[own_rows]  # -1: the own image is outside the pool
        n = len(text)
        self.rows = np.full((n, self.k), -1, dtype=np.int64)
        self.scores = np.zeros((n, self.k), dtype=np.float32)
        self.count = np.full(n, -1, dtype=np.int64)
        self.fallback = np.zeros(n, dtype=bool)

    def __repr__(self) -> str:
        return (
            f"_RuleSearch(mode={self.mode!r}, top_k={self.k}, tau={self.tau:.4f}, pool={len(self.pool)}, "
            f"first_depth={self.first_depth}, widen={self.widen})"
        )

    def search(self, index: faiss.Index, sentences: np.ndarray, threads: int) -> np.ndarray:
        """Decide the sentences whose lists from ``index`` hold ``top_k`` survivors; return the others."""
        todo = sentences[np.argsort(self.own_rows[sentences], kind="stable")]  # same image together
        if self.mode == "i2i" and is_cpu(index):
            return self._search_outside_drops(index, todo, threads)
        depths = (self.first_depth, max(self.widen * self.first_depth, self.k + math.ceil(2 * self.dropped_share * len(self.pool))))
        if self.rescore:  # one pass, deep enough from the start: see the class docstring
            depths = (4 * depths[1],)
        for depth in depths:
            if not todo.size:
                break
            depth = list_depth(index, depth)
            _LOG.info("%s: top-%d lists for %d sentences", type(index).__name__, depth, len(todo))
            set_depth(index, depth)
            batch = max(1, self.batch_entries // depth)
            todo = np.concatenate([self._lists(index, todo[s : s + batch], depth) for s in range(0, len(todo), batch)])
        return todo

    def _search_outside_drops(self, index: faiss.Index, todo: np.ndarray, threads: int) -> np.ndarray:
        """i2i on a CPU index: per own image, its drops found by a range search, then its sentences'
        lists searched without them (class docstring). ``todo`` is sorted by own image. Batches of
        images go to ``threads`` threads, each running FAISS on one OpenMP thread (a call holds one to
        a few sentences: too few to share out)."""
        images, first = np.unique(self.own_rows[todo], return_index=True)
        groups = np.split(todo, first[1:])
        length = self.first_depth
        if self.rescore:  # about 2.5% of the pool, from 16 to pq_depth times first_depth (class docstring)
            length = int(np.clip(len(self.pool) // 40, 16 * self.first_depth, self.pq_depth * self.first_depth))
        depths = [list_depth(index, d) for d in (length, self.widen * length)]
        _LOG.info("%s: %d own images' drops excluded from top-%d lists of %d sentences",
                  type(index).__name__, len(images), depths[0], len(todo))
        # range searches of about a million results at a time (12 bytes each)
        batch = max(1, min(256, int(2**20 // max(1.0, 2 * self.dropped_share * len(self.pool)))))
        starts = range(0, len(images), batch)
        parameters = selector_parameters(index)

        def search_batch(start: int) -> list[np.ndarray]:
            faiss.omp_set_num_threads(1)  # this thread's OpenMP setting
            own = _float32(self.image[images[start : start + batch]])
            limits, _, found = index.range_search(own, float(self.tau))
            short = []
            for j, sent in enumerate(groups[start : start + batch]):
                candidates = found[limits[j] : limits[j + 1]]
                drops = candidates[self.pool_vectors.dot(candidates, own[j]) > self.tau]
                if self.own_pos[sent[0]] >= 0:
                    drops = np.append(drops, self.own_pos[sent[0]])
                excluded = faiss.IDSelectorBatch(drops)
                allowed = faiss.IDSelectorNot(excluded)  # holds ``excluded``'s address: both live until the end
                for depth in depths:
                    sent = self._lists(index, sent, depth, parameters(allowed, depth))
                    if not sent.size:
                        break
                short.append(sent)
            return short

        with ThreadPoolExecutor(threads) as workers:
            short = [sent for part in workers.map(search_batch, starts) for sent in part]
        return np.concatenate(short)

    def _lists(self, index: faiss.Index, sent: np.ndarray, depth: int, params=None) -> np.ndarray:
        score, pos = index.search(self.text[sent], depth, params=params)
        if self.rescore or not is_cpu(index):
            score, pos = self._rescored(sent, pos)
        valid = (pos >= 0) & (pos != self.own_pos[sent, None])
        keep = valid & ~self._dropped_along(sent, score, pos, valid)
        done = keep.sum(axis=1) >= self.k
        self._record(sent[done], score[done], pos[done], keep[done])
        return sent[~done]

    def _rescored(self, sent: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A list's exact float32 cosines (PQ codes and GPU fp16 only approximate them), re-ranked by
        score then position; empty slots (-1) last, at -inf."""
        score = np.full(pos.shape, -np.inf, dtype=np.float32)
        chunk = max(1, 2**11 // pos.shape[1])  # gathers at most 2**11 candidate vectors (4 MB) at once
        for start in range(0, len(sent), chunk):
            part = slice(start, start + chunk)
            vectors = self.pool_vectors.take(np.maximum(pos[part], 0))
            exact = np.einsum("ij,ikj->ik", self.text[sent[part]], vectors)
            score[part] = np.where(pos[part] >= 0, exact, -np.inf)
        order = np.lexsort((pos, -score), axis=-1)
        return np.take_along_axis(score, order, axis=1), np.take_along_axis(pos, order, axis=1)

    def whole_pool(self, sentences: np.ndarray, threads: int) -> None:
        """Decide sentences on their full score rows, ``threads`` blocks at a time (see select_negatives)."""
        if not sentences.size:
            return
        _LOG.info("whole-pool score rows for %d sentences", len(sentences))
        todo = sentences[np.argsort(self.own_rows[sentences], kind="stable")]  # same image together
        rows = max(self.min_rows, self.block_bytes // (4 * len(self.pool)))
        blocks = [todo[start : start + rows] for start in range(0, len(todo), rows)]
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as workers:
            for _ in workers.map(self._score_block, blocks):
                pass  # re-raises a worker's exception

    def _score_block(self, sent: np.ndarray) -> None:
        score = self.pool_vectors.scores(self.text[sent])
        own = self.own_pos[sent]
        in_pool = np.flatnonzero(own >= 0)
        score[in_pool, own[in_pool]] = -np.inf
        if self.mode == "t2i":
            np.putmask(score, score > self.tau, -np.inf)
        else:  # one i2i row per distinct own image of the block, its drops applied to the image's sentences
            images, image_of = np.unique(self.own_rows[sent], return_inverse=True)
            drops = self.pool_vectors.scores(_float32(self.image[images])) > self.tau
            score[drops[image_of]] = -np.inf
        best, pos = faiss.kmax(score, min(self.k, len(self.pool)))
        kept = pos >= 0  # dropped (-inf) scores never enter FAISS's heap
        fallback = ~kept[:, 0]
        self._record(sent[~fallback], best[~fallback], pos[~fallback], kept[~fallback])
        if fallback.any():  # rare: recompute the rows the filter emptied, and take their least similar
            sent = sent[fallback]
            score = self.pool_vectors.scores(self.text[sent])
            positions = np.broadcast_to(np.arange(len(self.pool)), score.shape)
            valid = positions != self.own_pos[sent, None]
            # the last top_k of the ranked list: the first top_k of it reversed, then put best first
            self._record(sent, -score, positions, valid, reverse=True)

    def _dropped_along(self, sent, score, pos, valid) -> np.ndarray:
        """The filter's verdict on a list's candidates, computed (i2i) only until top_k survive."""
        if self.mode == "t2i":
            return score > self.tau
        dropped = np.zeros(pos.shape, dtype=bool)
        rows, start, width = np.arange(len(sent)), 0, self.k
        while rows.size and start < pos.shape[1]:
            stop = min(start + width, pos.shape[1])
            chunk = max(1, 2**11 // (stop - start))  # gathers at most 2**11 candidate vectors (4 MB) at once
            for part in np.split(rows, np.arange(chunk, len(rows), chunk)):
                own = _float32(self.image[self.own_rows[sent[part]]])
                i2i = np.einsum("ij,ikj->ik", own, self.pool_vectors.take(pos[part, start:stop]))
                dropped[part, start:stop] = i2i > self.tau
            kept = (valid[rows, :stop] & ~dropped[rows, :stop]).sum(axis=1)
            rows, start, width = rows[kept < self.k], stop, 2 * width
        return dropped

    def _record(self, sent, score, pos, keep, reverse: bool = False) -> None:
        """Keep each row's first top_k ``keep`` candidates by score, then lower position (= lower row).

        ``reverse``: ``score`` is negated and the picks are the last top_k of the ranked list, stored best first.
        """
        if not sent.size:
            return
        masked = np.where(keep, score, -np.inf)
        k = min(self.k, masked.shape[1])
        kth = -np.partition(-masked, k - 1, axis=1)[:, k - 1]  # the k-th best kept score
        r, c = np.nonzero(keep & (masked >= kth[:, None]))  # the top k and any ties with the k-th
        order = np.lexsort((-pos[r, c] if reverse else pos[r, c], -masked[r, c], r))
        r, c = r[order], c[order]
        first = np.searchsorted(r, np.arange(len(sent)))
        rank = np.arange(len(r)) - first[r]
        count = np.minimum(keep.sum(axis=1), self.k)
        taken = rank < count[r]
        r, c, rank = r[taken], c[taken], rank[taken]
        if reverse:
            rank = count[r] - 1 - rank
        self.rows[sent[r], rank] = self.pool[pos[r, c]]
        self.scores[sent[r], rank] = -score[r, c] if reverse else score[r, c]
        self.count[sent] = count
        self.fallback[sent] = reverse

    def selection(self) -> Selection:
        assert (self.count >= 0).all(), "a sentence was left without a decision"
        taken = np.arange(self.k) < self.count[:, None]
        offsets = np.concatenate([[0], np.cumsum(self.count)]).astype(np.int64)
        return Selection(offsets, self.rows[taken], self.scores[taken], self.fallback.copy(), self.tau)
