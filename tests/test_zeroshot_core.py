"""TAS's scoring core, spatial rectifier, crops and proposal filter against hand computation."""

import numpy as np
import pytest

from nemo_hf.zeroshot.crops import blurred_crop, centroid, gaussian_blur, masked_crop, pad_to_square
from nemo_hf.zeroshot.phrases import head_phrase
from nemo_hf.zeroshot.proposals import tas_filter
from nemo_hf.zeroshot.scoring import spatial_rectify, spatial_side, tas_scores


def _unit(*rows):
    a = np.asarray(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


# --- tas_scores ------------------------------------------------------------------------------


def test_tas_scores_visual_term_only_is_min_max_of_scaled_cosines():
    crops = _unit([1, 0, 0], [0.6, 0.8, 0], [0, 0, 1])
    text = _unit([1, 0, 0])[0]
    # raw: 100 * (1, 0.6, 0) -> min-max (1, 0.6, 0)
    np.testing.assert_allclose(tas_scores(crops, text), [1.0, 0.6, 0.0])


def test_tas_scores_all_terms_by_hand():
    crops = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    text = _unit([1, 1, 0])[0]  # (0.7071, 0.7071, 0)
    captions = _unit([0, 1, 0], [1, 0, 0], [1, 0, 0])
    negatives = _unit([1, 0, 0], [1, 0, 0])  # two phrases, both "like" crop 0
    s = 1 / np.sqrt(2)
    raw = np.array(
        [
            1.0 * 100 * s + 0.1 * 100 * s - 0.7 * 100 * 1.0,  # crop 0: N = mean(1, 1)
            1.0 * 100 * s + 0.1 * 100 * s - 0.0,
            0.0 + 0.1 * 100 * s - 0.0,
        ]
    )
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(tas_scores(crops, text, captions, negatives), expected)
    # weights and scale are parameters; a missing term counts 0
    raw2 = 2.0 * 10 * (crops @ text) - 0.5 * 10 * (crops @ negatives.T).mean(1)
    np.testing.assert_allclose(
        tas_scores(crops, text, None, negatives, logit_scale=10.0, weights=(2.0, 0.3, 0.5)),
        (raw2 - raw2.min()) / (raw2.max() - raw2.min()),
    )
    np.testing.assert_allclose(tas_scores(crops, text, None, negatives[:0]), tas_scores(crops, text))


def test_tas_scores_degenerate_cases():
    one = _unit([1, 2, 3])
    np.testing.assert_array_equal(tas_scores(one, one[0]), [0.0])  # a single proposal: no spread
    same = np.repeat(one, 3, axis=0)
    np.testing.assert_array_equal(tas_scores(same, one[0]), [0.0, 0.0, 0.0])
    assert tas_scores(np.zeros((0, 3)), one[0]).shape == (0,)
    with pytest.raises(ValueError, match="caption_emb"):
        tas_scores(same, one[0], caption_emb=one)
    with pytest.raises(ValueError, match="text_emb"):
        tas_scores(same, one[0][:2])


# --- spatial_rectify -------------------------------------------------------------------------

# Four proposals, one per quadrant around the median centroid (5, 5), and a weak fifth in the middle-right.
CENTROIDS = np.array([[1.0, 1.0], [1.0, 9.0], [9.0, 1.0], [9.0, 9.0], [5.0, 5.0]])  # (row, col): TL TR BL BR centre
SCORES = np.array([0.2, 0.4, 0.1, 0.3, 1.0])


@pytest.mark.parametrize(
    "words, expected",
    [
        # median row = median col = 5: the centre proposal (5, 5) is bottom (row >= 5) and right (col >= 5)
        (["man"], 4),  # no spatial word: argmax
        (["left"], 0),  # TL 0.2 vs BL 0.1
        (["leftmost"], 0),
        (["right"], 4),  # TR 0.4, BR {3: 0.3, 4: 1.0}
        (["top"], 1),  # TL 0.2 vs TR 0.4
        (["above"], 1),
        (["below"], 4),  # BL 0.1, BR best 1.0
        (["top", "left"], 0),
        (["top", "right"], 1),
        (["below", "left"], 2),
        (["south", "east"], 4),
        (["west", "north"], 0),
        (["bottom", "left"], 0),  # "bottom" is not among TAS's words: left alone
        (["under", "left"], 0),  # "under" only in TAS's relation branch
        (["left", "right"], 4),  # contradictory sides cancel: argmax
        (["top", "below", "left"], 0),  # vertical cancels, left stays
    ],
)
def test_spatial_rectify_sides_and_corners(words, expected):
    """nemo_hf's whole-word rule (``rule="words"``); TAS's default rule: tests/test_zeroshot_tas_fidelity.py."""
    assert spatial_rectify(SCORES, CENTROIDS, words, rule="words") == expected


def test_spatial_rectify_ties_single_proposal_and_empty_quadrant():
    tied = np.array([0.5, 0.5, 0.5, 0.5])
    quad = CENTROIDS[:4]
    rectify = lambda scores, centroids, words: spatial_rectify(scores, centroids, words, rule="words")  # noqa: E731
    assert rectify(tied, quad, ["right"]) == 1  # TR and BR tie: the lower index
    assert rectify(tied, quad, []) == 0
    # one proposal: it is at the median, so bottom-right; "top left" finds nothing and falls back to the argmax
    assert rectify(np.array([0.0]), np.array([[3.0, 4.0]]), ["top", "left"]) == 0
    assert rectify(np.array([0.0]), np.array([[3.0, 4.0]]), ["right"]) == 0
    # two proposals in one row: both have row == median, so nothing is "top": global argmax
    two = np.array([[5.0, 1.0], [5.0, 9.0]])
    assert rectify(np.array([0.2, 0.9]), two, ["top"]) == 1
    assert rectify(np.array([0.2, 0.9]), two, ["left"]) == 0
    assert rectify(np.array([0.2, 0.9]), two, ["below", "left"]) == 0
    assert rectify(np.array([0.2, 0.9]), two, "the bright laptop") == 1  # a sentence is split into whole words
    for rule in ("words", "tas"):
        with pytest.raises(ValueError, match="centroids"):
            spatial_rectify(tied, CENTROIDS, ["left"], rule=rule)
    with pytest.raises(ValueError, match="rule 'nearest'"):
        spatial_rectify(tied, quad, ["left"], rule="nearest")


def test_spatial_side_word_lists():
    assert spatial_side(["The", "LEFT", "one"]) == (None, "left")
    assert spatial_side(["eastern"]) == (None, "right")
    assert spatial_side(["underneath", "western"]) == ("bottom", "left")
    assert spatial_side(["bottom", "under", "low"]) == (None, None)


# --- crops -----------------------------------------------------------------------------------


def test_masked_crop_black_background_box_and_square_padding():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3) + 1  # no zero pixel anywhere
    mask = np.zeros((6, 8), dtype=bool)
    mask[1, 2:7] = True  # box rows 1..2, cols 2..6: 2 x 5
    mask[2, 3] = True
    crop = masked_crop(image, mask, box="extent")  # TAS's default box: tests/test_zeroshot_tas_fidelity.py
    # (5 - 2) // 2 = 1 black row above and below: 4 x 5, one short of a square as in TAS
    assert crop.shape == (4, 5, 3)
    np.testing.assert_array_equal(crop[0], 0)
    np.testing.assert_array_equal(crop[3], 0)
    np.testing.assert_array_equal(crop[1], image[1, 2:7])
    expected_row2 = np.zeros((5, 3), dtype=np.uint8)
    expected_row2[1] = image[2, 3]  # only the mask pixel survives; the rest of the box is black
    np.testing.assert_array_equal(crop[2], expected_row2)

    tall = np.zeros((6, 8), dtype=bool)
    tall[0:6, 4] = True  # 6 x 1: 2 black columns each side -> 6 x 5
    crop = masked_crop(image, tall, box="extent")
    assert crop.shape == (6, 5, 3)
    np.testing.assert_array_equal(crop[:, 2], image[:, 4])
    assert not crop[:, [0, 1, 3, 4]].any()
    with pytest.raises(ValueError, match="empty"):
        masked_crop(image, np.zeros((6, 8), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        masked_crop(image, np.ones((5, 8), dtype=bool))


def test_pad_to_square_even_difference_is_square():
    assert pad_to_square(np.ones((2, 6, 3), np.uint8)).shape == (6, 6, 3)
    assert pad_to_square(np.ones((7, 3), np.uint8)).shape == (7, 7)


def test_gaussian_blur_matches_opencv_definition():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)  # smaller than the kernel on one side
    sigma = 0.3 * ((75 - 1) * 0.5 - 1) + 0.8
    taps = np.arange(75) - 37
    k = np.exp(-(taps**2) / (2 * sigma**2))
    k /= k.sum()

    def reflect101(n, pad):
        out = []
        for i in range(-pad, n + pad):
            while i < 0 or i >= n:
                i = -i if i < 0 else 2 * (n - 1) - i
            out.append(i)
        return np.array(out)

    padded = image.astype(np.float64)[reflect101(40, 37)][:, reflect101(90, 37)]
    horiz = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, padded)
    both = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 0, horiz)
    expected = np.clip(np.round(both), 0, 255)
    got = gaussian_blur(image).astype(np.float64)
    assert got.shape == image.shape
    assert np.abs(got - expected).max() <= 1  # float32 convolution vs float64


def test_blurred_crop_keeps_mask_pixels_and_blurs_the_rest():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:15, 5:25] = True
    mask[10, 10] = False
    blurred = gaussian_blur(image)
    crop = blurred_crop(image, mask, blurred, box="extent")
    assert crop.shape == (20, 20, 3)  # 10 x 20 box padded by 5 rows each side
    np.testing.assert_array_equal(crop[5:15][mask[5:15, 5:25]], image[5:15, 5:25][mask[5:15, 5:25]])
    np.testing.assert_array_equal(crop[5 + 5, 5], blurred[10, 10])
    np.testing.assert_array_equal(crop[:5], 0)
    np.testing.assert_array_equal(blurred_crop(image, mask, box="extent"), crop)
    # TAS's box: rows 5..13, columns 5..23 (9 x 19), padded by (19 - 9) // 2 = 5 rows each side
    tas = blurred_crop(image, mask, blurred)
    assert tas.shape == (19, 19, 3)
    np.testing.assert_array_equal(tas[5:14], crop[5:14, :19])


def test_centroid_is_mean_row_and_column():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1, 1] = mask[3, 4] = True
    assert centroid(mask) == (2.0, 2.5)


# --- TAS's proposal filter -------------------------------------------------------------------


def _box_mask(y0, y1, x0, x1, shape=(100, 100)):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_tas_filter_on_hand_made_masks():
    masks = np.stack(
        [
            _box_mask(0, 40, 0, 40),  # 1600 px: under 2,000, dropped
            _box_mask(0, 50, 0, 100),  # 5000
            _box_mask(0, 50, 0, 50),  # 2500, inside mask 1 (overlap 1.0 of it): dropped
            _box_mask(40, 100, 0, 50),  # 3000, overlaps mask 1 by 500 = 0.167 of 3000: kept
            _box_mask(50, 100, 40, 100),  # 3000, overlaps mask 3 by 500: kept; equal area to 3
            _box_mask(60, 100, 50, 100),  # 2000 (exactly: kept by area) inside mask 4: dropped
        ]
    )
    np.testing.assert_array_equal(tas_filter(masks), [1, 3, 4])


def test_tas_filter_threshold_is_strict_and_ties_keep_the_first():
    a = _box_mask(0, 50, 0, 50)  # 2500
    b = _box_mask(0, 50, 30, 80)  # 2500, overlap 20 x 50 = 1000 = 0.4 of 2500: not over 0.4, both kept
    np.testing.assert_array_equal(tas_filter(np.stack([a, b])), [0, 1])
    c = _box_mask(0, 50, 29, 79)  # overlap 1050 > 1000: equal areas, the lower index stays
    np.testing.assert_array_equal(tas_filter(np.stack([a, c])), [0])
    np.testing.assert_array_equal(tas_filter(np.stack([c, a])), [0])
    assert tas_filter(np.zeros((0, 10, 10), dtype=bool)).size == 0


# --- head phrase (the offline negatives' synonym check) -----------------------------------------


@pytest.mark.parametrize(
    "expression, head",
    [
        ("the man in red on the left", "man"),
        ("left guy", "left guy"),
        ("giraffe standing next to the tree", "giraffe"),
        ("a white cup of coffee", "white cup"),
        ("the", "the"),
    ],
)
def test_head_phrase(expression, head):
    assert head_phrase(expression) == head


def test_tas_scores_unnormalised_is_s_itself():
    crops = _unit([1, 0, 0], [0.6, 0.8, 0])
    text = _unit([1, 0, 0])[0]
    negatives = _unit([0, 1, 0])
    np.testing.assert_allclose(
        tas_scores(crops, text, negative_emb=negatives, normalise=False), [100.0, 60.0 - 0.7 * 80.0]
    )


def _tampered(name: str, arrays: dict) -> dict:
    arrays = dict(arrays)
    if name == "mask counts pycocotools misreads":  # runs [5, 30, 40, 10, 2987], a delta written in 8 characters
        arrays["mask_counts"] = np.asarray(["5n0X1\\ooooooOSl2"])
    elif name == "mask of another size":
        arrays["mask_size"] = np.asarray([[64, 48]])
    elif name == "a proposal row missing":
        arrays["crop_emb"] = arrays["crop_emb"][:0]
    elif name == "NaN embedding":
        arrays["image_emb"] = np.full_like(arrays["image_emb"], np.nan)
    elif name == "pickled object array":
        arrays["mask_counts"] = np.asarray([{"counts": "x"}], dtype=object)
    return arrays


@pytest.mark.parametrize("name", ["mask counts pycocotools misreads", "mask of another size", "a proposal row missing",
                                  "NaN embedding", "pickled object array"])  # fmt: skip
def test_a_tampered_feature_cache_file_is_dropped_and_recomputed(tmp_path, name):
    """A cache file whose arrays disagree never reaches the scorer or the predictions file: it is dropped."""
    from nemo_hf.masks import encode_rle
    from nemo_hf.zeroshot.encode import FeatureCache, ImageFeatures

    mask = np.zeros((48, 64), np.uint8)
    mask[5:20, 3:30] = 1
    features = ImageFeatures((48, 64), [encode_rle(mask)], np.ones((1, 4), np.float32), np.asarray([[12.0, 16.0]]),
                             np.ones(4, np.float32))  # fmt: skip
    cache = FeatureCache(tmp_path, {"model": "test"})
    cache.put(1, "content", features)
    assert cache.get(1, "content").masks == features.masks  # the untouched file reads back
    with np.load(cache.directory / "1.npz") as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(cache.directory / "1.npz", **_tampered(name, arrays))
    with pytest.warns(UserWarning, match=r"dropping unreadable .*1\.npz"):
        assert cache.get(1, "content") is None
    assert not (cache.directory / "1.npz").exists()


def test_a_cache_file_declaring_a_huge_array_is_dropped_not_a_memory_error(tmp_path):
    """A few hundred bytes whose .npy headers declare 10^14 floats: np.load allocates before reading
    (MemoryError). Both caches treat it as unreadable. In a subprocess: the allocation is the risk."""
    import subprocess
    import sys

    code = r'''
import io, sys, warnings, zipfile
from pathlib import Path
from numpy.lib import format as npy
from nemo_hf.mining.cache import EmbeddingCache
from nemo_hf.zeroshot.encode import FeatureCache

header = io.BytesIO()
npy.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**7)})
def bomb(path, names):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            z.writestr(name + ".npy", header.getvalue() + bytes(64))
embeddings = EmbeddingCache(Path(sys.argv[1]) / "emb", {})
bomb(embeddings.directory / "chunk-x.npz", ["keys", "vectors"])
features = FeatureCache(Path(sys.argv[1]) / "feat", {"model": "test"})
bomb(features.directory / "1.npz", ["size", "mask_size", "mask_counts", "crop_emb", "centroids", "image_emb"])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert embeddings.load() == {} and features.get(1, "content") is None
assert sum("dropping unreadable" in str(w.message) for w in caught) == 2, [str(w.message) for w in caught]
print("dropped")
'''
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "dropped" in done.stdout, done.stderr[-2000:]
