"""The NeMo selection rule: hand-made cases with known answers, and the fast search against brute force."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nemo_hf.mining.negatives import MiningParams, resolve_tau, select_negatives
from nemo_hf.mining.refs import mine_refs


def unit(*rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# One sentence t = e1 whose own image (row 0) is e2. For the other rows:
#   row   t2i    i2i (to row 0)
#   1     0.981  0.196
#   2     0.707  0.707
#   3     0.894  0
#   4     0.447  0.894
#   5     0.555  0
#   6    -1      0
# t2i ranking without the own image: 1, 3, 2, 5, 4, 6.
IMAGES = unit([0, 1, 0], [1, 0.2, 0], [1, 1, 0], [1, 0, 0.5], [1, 2, 0], [1, 0, 1.5], [-1, 0, 0])
TEXT = unit([1, 0, 0])
OWN = np.array([0])
ALL = np.arange(len(IMAGES))


def chosen(selection, i=0) -> list[int]:
    return selection.negatives(i)[0].tolist()


def test_i2i_drops_images_like_the_target_and_keeps_top_k():
    sel = select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=0.5, top_k=3))
    assert chosen(sel) == [1, 3, 5]
    assert not sel.fallback[0]
    np.testing.assert_allclose(sel.negatives(0)[1], [0.9806, 0.8944, 0.5547], atol=1e-4)


def test_top_k_cut_and_no_filter():
    sel = select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=1.0, top_k=2))
    assert chosen(sel) == [1, 3]
    sel = select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=1.0, top_k=10))
    assert chosen(sel) == [1, 3, 2, 5, 4, 6]  # the whole pool but the own image, best first


def test_t2i_drops_images_too_close_to_the_sentence():
    sel = select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=0.9, top_k=3, mode="t2i"))
    assert chosen(sel) == [3, 2, 5]


def test_fallback_takes_the_least_similar_and_is_flagged():
    # every i2i similarity is >= 0 > tau: nothing survives, so the last 3 of the ranked list
    sel = select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=-0.1, top_k=3))
    assert chosen(sel) == [5, 4, 6] and sel.fallback[0] and sel.n_fallback == 1


def test_few_survivors_are_kept_without_fallback():
    # only row 6 (t2i exactly -1) is not above tau=-1
    sel = select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=-1.0, top_k=3, mode="t2i"))
    assert chosen(sel) == [6] and not sel.fallback[0]
    sel = select_negatives(TEXT, OWN, IMAGES, ALL[:-1], MiningParams(tau=-1.0, top_k=3, mode="t2i"))
    assert chosen(sel) == [2, 5, 4] and sel.fallback[0]


def test_pool_restriction_and_own_image_outside_the_pool():
    pool = np.array([2, 3, 4, 5, 6])  # neither row 1 nor the own image
    sel = select_negatives(TEXT, OWN, IMAGES, pool, MiningParams(tau=0.5, top_k=3))
    assert chosen(sel) == [3, 5, 6]
    assert 0 not in chosen(select_negatives(TEXT, OWN, IMAGES, ALL, MiningParams(tau=1.0, top_k=10)))


def test_ties_go_to_the_lower_row():
    images = np.concatenate([IMAGES, IMAGES[[3, 1]]])  # rows 7, 8 duplicate rows 3, 1
    sel = select_negatives(TEXT, OWN, images, np.arange(len(images)), MiningParams(tau=0.5, top_k=4))
    assert chosen(sel) == [1, 8, 3, 7]


def test_percentile_tau_is_the_percentile_of_the_filtered_similarity():
    rng = np.random.default_rng(0)
    images = unit(*rng.standard_normal((30, 8)))
    text = unit(*rng.standard_normal((12, 8)))
    own = rng.integers(0, 30, 12)
    pool = np.arange(30)
    # a sample of 40 x 40 pairs covers the 30 x 30 grid: the estimate is exact
    pairs = images.astype(np.float64) @ images.astype(np.float64).T
    expected = np.float32(np.percentile(pairs[~np.eye(30, dtype=bool)], 90))
    assert resolve_tau(MiningParams(tau="p90", sample_pairs=1600), text, own, images, pool) == expected
    t2i = text.astype(np.float64) @ images.astype(np.float64).T
    expected = np.float32(np.percentile(t2i[np.arange(30)[None, :] != own[:, None]], 75))
    assert resolve_tau(MiningParams(tau="p75", mode="t2i", sample_pairs=1600), text, own, images, pool) == expected
    # a smaller sample is seeded: same seed, same tau
    small = MiningParams(tau="p90", sample_pairs=100, seed=3)
    assert resolve_tau(small, text, own, images, pool) == resolve_tau(small, text, own, images, pool)
    selection = select_negatives(text, own, images, pool, MiningParams(tau="p90", sample_pairs=1600))
    assert selection.tau == float(np.float32(np.percentile(pairs[~np.eye(30, dtype=bool)], 90)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": "p0"}, "percentile"),
        ({"tau": "p100.5"}, "percentile"),
        ({"tau": "99"}, "percentile"),
        ({"tau": 1.5}, r"\[-1, 1\]"),
        ({"tau": True}, r"\[-1, 1\]"),
        ({"top_k": 0}, "top_k"),
        ({"mode": "x2y"}, "mode"),
        ({"index": "lsh"}, "index"),
        ({"sample_pairs": 10}, "sample_pairs"),
    ],
)
def test_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiningParams(**kwargs)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="row 0 has norm"):
        select_negatives(TEXT * 2, OWN, IMAGES, ALL)
    with pytest.raises(ValueError, match="text_image_row"):
        select_negatives(TEXT, np.array([7]), IMAGES, ALL)
    with pytest.raises(ValueError, match="more than once"):
        select_negatives(TEXT, OWN, IMAGES, np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="dims"):
        select_negatives(unit([1, 0]), OWN, IMAGES, ALL)


def brute_force(text, own, images, pool, tau, k, mode):
    """The rule spelled out: float64 dot products rounded to float32, ties by row; also returns the scores."""
    t2i = (text.astype(np.float64) @ images.astype(np.float64).T).astype(np.float32)
    i2i = (images.astype(np.float64) @ images.astype(np.float64).T).astype(np.float32)
    out = []
    for i in range(len(text)):
        candidates = pool[pool != own[i]]
        ranked = candidates[np.lexsort((candidates, -t2i[i, candidates]))]
        dropped = (i2i[own[i], ranked] if mode == "i2i" else t2i[i, ranked]) > tau
        survivors = ranked[~dropped]
        out.append((survivors[:k], False) if len(survivors) else (ranked[-k:], True))
    return out, t2i, i2i


def assert_rule_up_to_rounding(sel, text, own, images, pool, k, mode, tol=1e-5):
    """Each sentence's answer is brute force's, or differs only where scores agree within ``tol``.

    Where they differ: every pick passes the filter unless its similarity is within tol of tau, picks
    come best first, nothing left out clearly survives and clearly beats the last pick, and a
    fallback is taken only when nothing clearly survives, with the least similar images.
    """
    expected, t2i, i2i = brute_force(text, own, images, pool, sel.tau, k, mode)
    differing = 0
    for i, (rows, fallback) in enumerate(expected):
        got, scores = sel.negatives(i)
        np.testing.assert_allclose(scores, t2i[i, got], atol=tol)
        if got.tolist() == rows.tolist() and sel.fallback[i] == fallback:
            continue
        differing += 1
        candidates = pool[pool != own[i]]
        similarity = i2i[own[i]] if mode == "i2i" else t2i[i]
        surely_kept = candidates[similarity[candidates] <= sel.tau - tol]
        left_out = np.setdiff1d(candidates, got)
        assert np.all(np.diff(t2i[i, got]) <= tol), f"sentence {i}: picks not best first"
        if sel.fallback[i]:
            assert surely_kept.size == 0, f"sentence {i}: fallback although {surely_kept[0]} survives"
            assert len(got) == min(k, len(candidates))
            least = t2i[i, left_out].min(initial=np.inf) >= t2i[i, got].max() - tol
            assert least, f"sentence {i}: not the least similar"
        else:
            assert np.all(similarity[got] <= sel.tau + tol), f"sentence {i}: a pick the filter drops"
            missed = np.setdiff1d(surely_kept, got)
            assert len(got) == k or missed.size == 0, f"sentence {i}: {len(got)} picks with {missed} left out"
            if len(got) == k:
                better = t2i[i, missed].max(initial=-np.inf) > t2i[i, got[-1]] + tol
                assert not better, f"sentence {i}: missed a better one"
    return differing


@pytest.mark.parametrize("mode", ["i2i", "t2i"])
@pytest.mark.parametrize("tau", ["p50", "p95", "p99.9", -0.9])
def test_search_equals_brute_force(mode, tau):
    rng = np.random.default_rng(7)
    text, own, images = clustered(rng, 500, 240, 24, 12)
    pool = np.sort(rng.choice(500, 420, replace=False))
    params = MiningParams(tau=tau, top_k=9, mode=mode, sample_pairs=20_000)
    sel = select_negatives(text, own, images, pool, params)
    # well separated scores: float32 rounding changes no decision
    assert assert_rule_up_to_rounding(sel, text, own, images, pool, 9, mode) == 0
    assert select_negatives(text, own, images, pool, params, threads=1).rows.tolist() == sel.rows.tolist()


@pytest.mark.parametrize("mode", ["i2i", "t2i"])
def test_search_with_duplicate_images_in_many_blocks(mode, monkeypatch):
    # duplicated images score equal up to float32 rounding (BLAS may round two equal columns
    # differently), so either copy is the rule's; blocks of 16 rows make the threads share the work
    rng = np.random.default_rng(7)
    text, own, images = clustered(rng, 500, 240, 24, 12, duplicates=40)
    pool = np.sort(rng.choice(500, 420, replace=False))
    params = MiningParams(tau="p95", top_k=9, mode=mode, sample_pairs=20_000)
    monkeypatch.setattr("nemo_hf.mining.negatives._RuleSearch.block_bytes", 16 * 4 * len(pool))
    monkeypatch.setattr("nemo_hf.mining.negatives._RuleSearch.min_rows", 1)
    sel = select_negatives(text, own, images, pool, params, threads=2)
    assert_rule_up_to_rounding(sel, text, own, images, pool, 9, mode)
    assert select_negatives(text, own, images, pool, params, threads=1).rows.tolist() == sel.rows.tolist()


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_search_goes_past_candidates_the_filter_drops(index):
    # tight clusters of 60 (i2i > 0.82 within, < 0.5 across): a sentence's best ~60 candidates are its
    # cluster-mates, all dropped by i2i; an approximate index's first list (4 * top_k + 16 = 28 long)
    # then has no survivor and must be searched deeper
    rng = np.random.default_rng(5)
    centers = unit(*rng.standard_normal((10, 32)))
    images = unit(*(np.repeat(centers, 60, axis=0) + 0.05 * rng.standard_normal((600, 32))))
    own = rng.integers(0, 600, 50)
    text = unit(*(images[own] + 0.05 * rng.standard_normal((50, 32))))
    sel = select_negatives(text, own, images, np.arange(600), MiningParams(tau=0.8, top_k=3, index=index))
    if index == "flat":
        assert assert_rule_up_to_rounding(sel, text, own, images, np.arange(600), 3, "i2i") == 0
    assert (sel.counts == 3).all() and not sel.fallback.any()
    assert all(not np.isin(sel.negatives(i)[0] // 60, own[i] // 60).any() for i in range(50))


def clustered(rng, n_images, n_sentences, dim, n_clusters, duplicates=0):
    """Unit embeddings in clusters, sentences near their own image; ``duplicates`` images repeated exactly."""
    centers = unit(*rng.standard_normal((n_clusters, dim)))
    noise = rng.standard_normal((n_images, dim)) / np.sqrt(dim)
    images = centers[rng.integers(0, n_clusters, n_images)] + 0.6 * noise
    images[n_images - duplicates :] = images[:duplicates]
    images = unit(*images)
    own = rng.integers(0, n_images, n_sentences)
    text = unit(*(images[own] + rng.standard_normal((n_sentences, dim)) / np.sqrt(dim)))
    return text, own, images


def test_search_on_dense_scores_where_float32_cannot_order():
    # candidates within float32 rounding of each other and of tau: any order of them is the rule's
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal(64))[0]
    images = unit(*(base + 1e-4 * rng.standard_normal((300, 64))))
    text = unit(*(base + 1e-4 * rng.standard_normal((20, 64))))
    own = rng.integers(0, 300, 20)
    for mode in ("i2i", "t2i"):
        sel = select_negatives(text, own, images, np.arange(300), MiningParams(tau="p60", top_k=12, mode=mode))
        assert (sel.counts == 12).all()
        assert_rule_up_to_rounding(sel, text, own, images, np.arange(300), 12, mode)


@pytest.mark.parametrize("index", ["ivf", "hnsw", "ivfpq"])
def test_approximate_indexes_recall(index):
    # the bound: 90% of the exact top-20 survivors found (IVF-PQ: 6 codes of 6 bits an image here)
    rng = np.random.default_rng(3)
    text, own, images = clustered(rng, 4000, 200, 48, 60)
    pool = np.arange(4000)
    exact = select_negatives(text, own, images, pool, MiningParams(top_k=20))
    approx = select_negatives(text, own, images, pool, MiningParams(top_k=20, index=index))
    recall = np.mean([len(np.intersect1d(exact.negatives(i)[0], approx.negatives(i)[0])) / 20 for i in range(200)])
    assert recall >= 0.9
    assert approx.tau == exact.tau and (approx.counts == 20).all()
    for i in range(200):  # scores are the exact cosines, best first
        rows, scores = approx.negatives(i)
        np.testing.assert_allclose(scores, images[rows] @ text[i], atol=1e-6)
        assert (np.diff(scores) <= 0).all()
        assert (images[rows] @ images[own[i]] <= approx.tau).all()  # the filter is exact, whatever the codes say
    own_picked = [own[i] in approx.negatives(i)[0] for i in range(200)]
    assert not any(own_picked)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:64]
    colour = rng.uniform(0, 255, 3)
    pixels = np.clip(colour + 60 * np.sin(x / (5 + seed) + y / 9)[..., None], 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_mine_refs_columns_and_provenance(tmp_path):
    from nemo_hf.mining.embed import demo_embedder

    with pytest.warns(UserWarning, match="MEANINGLESS"):
        embedder = demo_embedder(progress=False, num_workers=0)
    files = {image_id: _jpeg(image_id) for image_id in range(1, 13)}
    path = tmp_path / "12.jpg"
    path.write_bytes(files.pop(12))
    files[12] = path  # paths and bytes both work
    refs = [
        {"ref_id": 7, "image_id": 1, "sentences": [{"sent_id": 70, "sent": "man on the left"}]},
        {
            "ref_id": 8,
            "image_id": 12,
            "sentences": [{"sent_id": 80, "sent": "red car"}, {"sent_id": 81, "sent": "car"}],
        },
    ]
    pool = list(range(1, 12))  # image 12 lies outside the pool, as with google splits
    params = MiningParams(tau="p90", top_k=4, sample_pairs=400)
    columns, provenance = mine_refs(refs, files, pool, embedder, params, cache_dir=tmp_path / "cache")
    assert set(columns) == {7, 8}
    negatives, scores, fallback = columns[8]
    assert len(negatives) == len(scores) == len(fallback) == 2
    assert all(set(n) <= set(pool) and 12 not in n and len(n) == len(s) for n, s in zip(negatives, scores))
    assert 1 not in columns[7].negatives[0]
    assert all(a >= b for s in scores for a, b in zip(s, s[1:]))  # best first
    assert provenance["model"]["model_id"] == "nemo_hf-demo-clip-seed0"
    assert provenance["embedding_dtype"] == "torch.float32" and provenance["image_preprocessing_sha256"]
    assert provenance["tau"] == "p90" and -1 <= provenance["tau_cosine"] <= 1
    assert (provenance["pool_size"], provenance["sentences"], provenance["top_k"]) == (11, 3, 4)
    assert provenance["fallback_sentences"] == sum(f for _, _, fs in columns.values() for f in fs)
    again, _ = mine_refs(refs, files, pool, embedder, params, cache_dir=tmp_path / "cache")
    assert again == columns
    with pytest.raises(KeyError, match="image id 12"):
        mine_refs(refs, {k: v for k, v in files.items() if k != 12}, pool, embedder, params)
    with pytest.raises(ValueError, match="ref 7 appears twice"):
        mine_refs(refs + refs[:1], files, pool, embedder, params)


def test_mine_refs_memory_maps_the_pool_for_an_approximate_index(tmp_path, monkeypatch):
    """With an approximate index and a cache, select_negatives gets the image embeddings as a read-only
    memory map, and its negatives are those of the same rule on the embeddings held in RAM."""
    import nemo_hf.mining.refs as mine
    from nemo_hf.mining.embed import demo_embedder

    with pytest.warns(UserWarning, match="MEANINGLESS"):
        embedder = demo_embedder(progress=False, num_workers=0, batch_size=8)
    files = {image_id: _jpeg(image_id) for image_id in range(1, 41)}
    refs = [
        {"ref_id": r, "image_id": 1 + 7 * r, "sentences": [{"sent_id": 10 * r, "sent": text}]}
        for r, text in enumerate(["man on the left", "red car", "the dog", "small white cup", "woman with a hat"])
    ]
    calls = []

    def spy(text_emb, text_image_row, image_emb, pool_rows, params):
        calls.append((text_emb, text_image_row, image_emb, pool_rows, params))
        return select_negatives(text_emb, text_image_row, image_emb, pool_rows, params)

    monkeypatch.setattr(mine, "select_negatives", spy)
    pool = list(range(1, 41))
    for index in ("ivf", "flat"):
        params = MiningParams(tau="p90", top_k=4, sample_pairs=400, index=index)
        columns, _ = mine_refs(refs, files, pool, embedder, params, cache_dir=tmp_path / "cache")
        text_emb, text_image_row, image_emb, pool_rows, _ = calls[-1]
        assert isinstance(image_emb, np.memmap) == (index == "ivf")
        in_ram = embedder.embed_images(sorted(files.items()), cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(image_emb, in_ram)
        expected = select_negatives(text_emb, text_image_row, in_ram, pool_rows, params)
        negatives = [columns[ref["ref_id"]].negatives[0] for ref in refs]
        assert negatives == [(1 + expected.negatives(i)[0]).tolist() for i in range(len(refs))]  # row + 1 = image id
    assert not calls[0][2].flags.writeable


@pytest.mark.parametrize("mode", ["i2i", "t2i"])
def test_lists_reach_past_what_the_filter_drops(mode, caplog):
    # tau="p80" drops ~20% of a 5000-image pool (~1000 images) per sentence, past 768-deep lists.
    # i2i: each own image's drops are excluded from its sentences' lists, which stay top_k-sized;
    # t2i: the deep lists are sized by that share. Either way sentences are decided from the lists.
    rng = np.random.default_rng(4)
    text, own, images = clustered(rng, 5000, 300, 32, 8)
    pool = np.arange(5000)
    params = MiningParams(tau="p80", top_k=20, index="ivf", mode=mode)
    with caplog.at_level("INFO", logger="nemo_hf.mining.negatives"):
        approx = select_negatives(text, own, images, pool, params)
    lists = [r.getMessage() for r in caplog.records if "top-" in r.getMessage()]
    if mode == "i2i":
        assert len(lists) == 1 and "drops excluded from top-96 lists" in lists[0]
    else:
        assert len(lists) == 2 and int(lists[1].split("top-")[1].split()[0]) >= 2 * 1000
    whole = [int(r.getMessage().split()[-2]) for r in caplog.records if "whole-pool" in r.getMessage()]
    assert sum(whole) <= 300 // 20
    exact = select_negatives(text, own, images, pool, MiningParams(tau="p80", top_k=20, mode=mode))
    recall = np.mean([len(np.intersect1d(exact.negatives(i)[0], approx.negatives(i)[0])) / 20 for i in range(300)])
    assert recall >= 0.9
    if mode == "i2i":  # the exact filter holds for every pick, whatever the index found
        for i in range(300):
            assert (images[approx.negatives(i)[0]] @ images[own[i]] <= approx.tau).all()


@pytest.mark.parametrize("index", ["flat", "ivf", "ivfpq"])
@pytest.mark.parametrize("mode", ["i2i", "t2i"])
def test_memory_mapped_float16_pool_is_read_in_blocks_with_the_same_result(index, mode, tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    text, own, images = clustered(rng, 1500, 120, 32, 20)
    path = tmp_path / "pool.npy"
    np.save(path, images.astype(np.float16))
    mapped = np.load(path, mmap_mode="r")
    rounded = np.asarray(mapped, dtype=np.float32)  # the same values, in RAM
    pool = np.sort(rng.choice(1500, 1300, replace=False))
    params = MiningParams(tau="p95", top_k=10, mode=mode, index=index, sample_pairs=20_000)
    in_ram = select_negatives(text, own, rounded, pool, params, threads=1)
    from_map = select_negatives(text, own, mapped, pool, params, threads=1)
    assert from_map.rows.tolist() == in_ram.rows.tolist() and from_map.tau == in_ram.tau
    np.testing.assert_array_equal(from_map.scores, in_ram.scores)


@pytest.mark.parametrize("index", ["flat", "ivfpq"])
def test_a_memory_mapped_pool_never_enters_ram_whole(index, tmp_path, monkeypatch):
    # numpy's allocations (tracemalloc sees them) stay well under the pool's float32 size (102 MB),
    # which np.asarray(memmap, np.float32) anywhere on the way would allocate at once
    import tracemalloc

    rng = np.random.default_rng(13)
    path = tmp_path / "pool.npy"
    pool_map = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(100_000, 256))
    centers = unit(*rng.standard_normal((50, 256)))
    for start in range(0, 100_000, 10_000):
        noise = rng.standard_normal((10_000, 256)) / 16
        pool_map[start : start + 10_000] = unit(*(centers[rng.integers(0, 50, 10_000)] + noise))
    pool_map.flush()
    mapped = np.load(path, mmap_mode="r")
    own = rng.integers(0, 100_000, 20)
    text = unit(*(np.asarray(mapped[np.sort(own)], np.float32) + rng.standard_normal((20, 256)) / 16))
    own = np.sort(own)
    monkeypatch.setattr("nemo_hf.mining.pool._BLOCK_ROWS", 8192)
    tracemalloc.start()
    try:
        selection = select_negatives(text, own, mapped, np.arange(100_000), MiningParams(index=index), threads=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (selection.counts == 20).all()
    assert peak < 100_000 * 256 * 4 / 2, f"{peak / 2**20:.0f} MB allocated at the peak"


def test_build_index_once_for_many_sentence_sets():
    from nemo_hf.mining.negatives import build_index

    rng = np.random.default_rng(12)
    text, own, images = clustered(rng, 2000, 100, 32, 20)
    pool = np.arange(100, 2000)
    params = MiningParams(top_k=10, index="ivfpq")
    index = build_index(images, pool, params)
    assert index.ntotal == 1900
    for part in (slice(0, 50), slice(50, 100)):
        reused = select_negatives(text[part], own[part], images, pool, params, index=index)
        built = select_negatives(text[part], own[part], images, pool, params)
        assert reused.rows.tolist() == built.rows.tolist()
    with pytest.raises(ValueError, match="exact search"):
        build_index(images, pool, MiningParams())
    with pytest.raises(ValueError, match="index holds 1900 vectors"):
        select_negatives(text, own, images, np.arange(2000), params, index=index)


@pytest.mark.parametrize("mode", ["i2i", "t2i"])
def test_a_pool_too_small_to_choose_from_keeps_nothing_instead_of_failing(mode):
    """A tiny source: the pool is empty, or its one image is every sentence's own; or one image, which a
    percentile tau has no pair to be estimated from (nothing to drop: tau 1.0) but another sentence may take."""
    image = unit([1, 0], [0, 1], [1, 1])
    text = unit([1, 0.2], [0.2, 1])
    params = MiningParams(tau="p99", top_k=3, mode=mode)
    for pool, own in (([], [0, 1]), ([0], [0, 0])):
        selection = select_negatives(text, np.array(own), image, np.array(pool, dtype=np.int64), params)
        assert selection.counts.tolist() == [0, 0] and selection.tau == 1.0
    selection = select_negatives(text, np.array([0, 1]), image, np.array([0]), params)
    assert selection.counts.tolist() == [0, 1] and selection.negatives(1)[0].tolist() == [0]
