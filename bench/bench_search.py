"""Negative selection at RefCOCO scale against its floor: one dense sentence x image product.

Embeddings are synthetic with the structure that matters to the rule: a component shared by all
images (CLIP image cosines sit well above 0), images in clusters of varied size and tightness,
sentences near their own image plus a shared text direction (the modality gap). The i2i filter then
removes the sentence's cluster-mates, which are its best t2i candidates.

The floor is the blocked float32 product ``text @ image.T`` with numpy BLAS (the full 140k x 20k
matrix would take 11 GB, so it is computed in blocks and dropped), BLAS on all cores; the selection
is ``nemo_hf.mining.negatives.select_negatives`` on the same arrays in the same run: the same product in blocks,
one block per core, plus the filter (for i2i, one image-image row per distinct own image, about a
seventh of the product here), FAISS's top-k heap, and the fallbacks. Peak memory is the process's peak
RSS (``resource.getrusage``), which includes the inputs.

    python bench/bench_search.py [--images 20000] [--sentences 140000] [--dim 512]

``--indexes flat,ivf,ivfpq`` instead compares the indexes on one pool (i2i, top-20): each runs in a
forked child, which reports the index build time, the selection's time after it, the index's RSS, the
child's peak anonymous memory above the parent's at the fork (what the selection adds to the inputs;
sampled every 20 ms), and recall@20 against the flat (exact) selection: the share of the exact
negatives the index also chose. ``--memmap DIR`` writes the image embeddings to DIR as a float16 ``.npy``
(2 GB at 1M x 512) and hands every index a read-only memory map of it: the pool never sits in the
process's own memory (the page cache holds what was read), which is how a pool of 10M is mined.

    python bench/bench_search.py --images 1000000 --sentences 2000 --indexes flat,ivf,ivfpq
    python bench/bench_search.py --images 1000000 --sentences 1000 --indexes flat,ivfpq --memmap /tmp/pool
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from nemo_hf.mining.negatives import MiningParams, build_index, select_negatives


def clustered_embeddings(n_images: int, n_sentences: int, dim: int, seed: int = 0, image=None, per_image: int = 8):
    """Unit float32 (text, text_image_row, image) with clusters, a shared image direction and a modality gap.

    Sentences come ``per_image`` to an own image, as in RefCOCO (142k sentences on 17k images).
    ``image``: an (n_images, dim) array to fill (e.g. a float16 memory map) instead of a new float32 one."""
    rng = np.random.default_rng(seed)
    shared, text_dir = _unit(rng.standard_normal((2, dim)))
    n_clusters = max(1, n_images // 50)
    sizes = rng.zipf(1.6, n_clusters).clip(1, 40 * 50).astype(float)
    cluster = rng.choice(n_clusters, size=n_images, p=sizes / sizes.sum())
    centers = _unit(rng.standard_normal((n_clusters, dim)))
    tightness = rng.uniform(0.35, 0.8, n_clusters)[cluster, None]
    image = np.empty((n_images, dim), dtype=np.float32) if image is None else image
    for start in range(0, n_images, 65536):  # in blocks: 1M x 512 float64 temporaries would take GBs
        part = slice(start, start + 65536)
        noise = _unit(rng.standard_normal((len(cluster[part]), dim), dtype=np.float32))
        image[part] = _unit(0.6 * shared + tightness[part] * centers[cluster[part]] + 0.5 * noise)
    owners = rng.choice(n_images, size=min(n_images, -(-n_sentences // per_image)), replace=False)
    own = np.sort(np.resize(owners, n_sentences))
    text = np.empty((n_sentences, dim), dtype=np.float32)
    for start in range(0, n_sentences, 16384):
        part = own[start : start + 16384]
        noise = _unit(rng.standard_normal((len(part), dim), dtype=np.float32))
        text[start : start + 16384] = _unit(0.55 * _unit(image[part]) + 0.6 * text_dir + 0.6 * noise)
    return text, own, image


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def dense_product_seconds(text: np.ndarray, image: np.ndarray, block: int = 2048) -> float:
    out = np.empty((block, len(image)), dtype=np.float32)
    start_time = time.perf_counter()
    for start in range(0, len(text), block):
        part = text[start : start + block]
        np.matmul(part, image.T, out=out[: len(part)])
    return time.perf_counter() - start_time


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def anonymous_gb() -> float:
    """This process's own memory (RssAnon): what a memory map's page cache does not count in."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    return kb / 2**20


class PeakAnonymous:
    """The largest ``anonymous_gb`` seen while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = anonymous_gb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anonymous_gb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_gb())


_INPUTS: tuple = ()  # set before forking: the children read the parent's arrays without a copy


def _run_index(index: str) -> dict:
    text, own, image, pool = _INPUTS
    params = MiningParams(index=index)
    start_anon = anonymous_gb()
    built, index_bytes, faiss_index = 0.0, 0.0, None
    with PeakAnonymous() as peak:
        if index != "flat":
            start = time.perf_counter()
            faiss_index = build_index(image, pool, params)
            built = time.perf_counter() - start
            index_bytes = (anonymous_gb() - start_anon) * 2**30  # what the index holds once built
        start = time.perf_counter()
        selection = select_negatives(text, own, image, pool, params, index=faiss_index)
        seconds = time.perf_counter() - start
    return {
        "build": built, "search": seconds, "index_bytes": index_bytes, "anon_added": peak.peak - start_anon,
        "offsets": selection.offsets, "rows": selection.rows,
    }


def compare_indexes(text, own, image, pool, indexes: list[str]) -> None:
    global _INPUTS
    _INPUTS = (text, own, image, pool)
    exact = None
    print("index | build s | selection s (after the build) | index MB | peak memory added GB | recall@20 vs flat")
    for index in ["flat"] + [i for i in indexes if i != "flat"]:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
            r = child.submit(_run_index, index).result()
        exact = exact or r
        hits = [
            len(np.intersect1d(exact["rows"][exact["offsets"][i] : exact["offsets"][i + 1]],
                               r["rows"][r["offsets"][i] : r["offsets"][i + 1]]))
            / max(1, exact["offsets"][i + 1] - exact["offsets"][i])
            for i in range(len(text))
        ]
        print(f"{index} | {r['build']:.1f} | {r['search']:.1f} | {r['index_bytes'] / 2**20:.0f} | "
              f"{r['anon_added']:.2f} | {np.mean(hits):.4f} (min {np.min(hits):.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--sentences", type=int, default=140_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--modes", default="i2i,t2i")
    parser.add_argument("--indexes", help="compare these indexes (comma-separated) against flat instead")
    parser.add_argument("--memmap", metavar="DIR", help="with --indexes: the pool as a float16 memory map in DIR")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")

    start = time.perf_counter()
    image = None
    if args.memmap:
        os.makedirs(args.memmap, exist_ok=True)
        handle, path = tempfile.mkstemp(suffix=".npy", dir=args.memmap)
        os.close(handle)
        image = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(args.images, args.dim))
    text, own, image = clustered_embeddings(args.images, args.sentences, args.dim, image=image)
    if args.memmap:
        image.flush()
        del image
        image = np.load(path, mmap_mode="r")
        os.unlink(path)  # the map keeps the file until the process ends
    pool = np.arange(args.images)
    cores = len(os.sched_getaffinity(0))
    print(f"{args.sentences} sentences x {args.images} pool images, d={args.dim}, {image.dtype}"
          f"{' memory-mapped' if args.memmap else ''}; {cores} cores (BLAS: all)")
    print(f"inputs ready in {time.perf_counter() - start:.0f} s, own memory {anonymous_gb():.2f} GB")
    if args.indexes:
        compare_indexes(text, own, image, pool, args.indexes.split(","))
        return
    # The machine may be shared: the floor is taken before and after the selections, and averaged.
    floor_before = dense_product_seconds(text, image)
    timings = {}
    for mode in args.modes.split(","):
        params = MiningParams(mode=mode)
        print(f"{mode}:")
        start = time.perf_counter()
        selection = select_negatives(text, own, image, pool, params)
        timings[mode] = (time.perf_counter() - start, params, selection, peak_rss_gb())
    floor_after = dense_product_seconds(text, image)
    floor = (floor_before + floor_after) / 2
    print(
        f"floor (blocked dense product, numpy BLAS): {floor:.1f} s "
        f"({floor_before:.1f} before, {floor_after:.1f} after)"
    )
    for mode, (seconds, params, selection, rss) in timings.items():
        counts = selection.counts
        print(
            f"{mode}: {seconds:.1f} s = {seconds / floor:.2f}x floor | tau {params.tau} -> {selection.tau:.4f} | "
            f"negatives/sentence min {counts.min()} mean {counts.mean():.1f} | fallback {selection.n_fallback} | "
            f"peak RSS after it {rss:.2f} GB"
        )


if __name__ == "__main__":
    main()
