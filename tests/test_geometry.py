"""The shared tile geometry: cells, placements, RLE sampling, box mapping, mapping predictions back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from PIL import Image, ImageFilter

from nemo_hf.transforms.geometry import (
    Placement,
    grid_cells,
    mask_box,
    prediction_to_original,
    resize_pixels,
)
from nemo_hf.masks import encode_rle, rle_runs, rle_sample


@pytest.mark.parametrize("size", [2, 3, 417, 480])
def test_grid_cells_tile_the_output_row_major(size):
    cells = grid_cells(size)
    cover = np.zeros((size, size), dtype=int)
    for x, y, w, h in cells:
        cover[y : y + h, x : x + w] += 1
    assert (cover == 1).all()
    (x0, y0, *_), (x1, *_), (_, y2, *_), _ = cells
    assert (x0, y0) == (0, 0) and x1 > 0 and y2 > 0  # 0 TL, 1 TR, 2 BL
    if size == 417:
        assert [c[2] for c in cells] == [208, 209, 208, 209]


def test_grid_needs_two_pixels():
    with pytest.raises(ValueError, match="at least 2"):
        grid_cells(1)


def test_letterbox_keeps_aspect_and_centres():
    placement = Placement.fit((640, 480), (240, 0, 240, 240), "letterbox")
    assert (placement.w, placement.h) == (240, 180)
    assert (placement.x, placement.y) == (240, 30)
    assert placement.scale_x == pytest.approx(placement.scale_y)
    squash = Placement.fit((640, 480), (240, 0, 240, 240), "squash")
    assert squash.content_box == (240, 0, 480, 240)
    with pytest.raises(ValueError, match="tile mode"):
        Placement.fit((10, 10), (0, 0, 5, 5), "stretch")


masks = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.floats(0, 1)).map(
    lambda a: (np.random.default_rng(a[2]).random((a[1], a[0])) < a[3]).astype(np.uint8)
)


@settings(max_examples=150, deadline=None)
@given(mask=masks, out_w=st.integers(1, 90), out_h=st.integers(1, 90))
def test_rle_sample_equals_full_decode_then_nearest(mask, out_w, out_h):
    rle = encode_rle(mask)
    assert rle_runs(rle["counts"]).sum() == mask.size
    placement = Placement(mask.shape[1], mask.shape[0], 0, 0, out_w, out_h)
    rows, cols = placement.source_rows_cols()
    expected = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})[np.ix_(rows, cols)]
    np.testing.assert_array_equal(rle_sample(rle, rows, cols), expected)


def test_rle_sample_rejects_counts_of_the_wrong_total():
    rle = encode_rle(np.ones((4, 5), np.uint8))
    with pytest.raises(ValueError, match="h\\*w"):
        rle_sample({"size": [4, 6], "counts": rle["counts"]}, np.arange(4), np.arange(6))


def test_place_mask_checks_the_size_against_the_image():
    placement = Placement.fit((50, 40), (0, 0, 20, 20))
    with pytest.raises(ValueError, match="does not match the image size"):
        placement.place_mask(encode_rle(np.ones((50, 40), np.uint8)), np.zeros((20, 20), np.uint8))


def test_map_box_scales_offsets_and_clips():
    placement = Placement.fit((200, 100), (100, 50, 100, 100), "squash")  # x2 down in x, same y
    assert placement.map_box([20, 10, 40, 30]) == pytest.approx([110, 60, 20, 30])
    assert placement.map_box([180, 90, 100, 100]) == pytest.approx([190, 140, 10, 10])


def test_mask_box_is_tight_in_pixel_edges():
    mask = np.zeros((10, 12), np.uint8)
    mask[3:5, 7] = 1
    assert mask_box(mask, (100, 200)) == [107.0, 203.0, 1.0, 2.0]
    assert mask_box(np.zeros((3, 3), np.uint8)) is None


def test_prediction_maps_back_to_the_original_resolution():
    orig = np.zeros((300, 500), np.uint8)
    orig[100:220, 150:400] = 1
    placement = Placement.fit((500, 300), (0, 0, 480, 480), "letterbox")
    canvas = np.zeros((480, 480), np.uint8)
    placement.place_mask(encode_rle(orig), canvas)
    back = prediction_to_original(canvas, (300, 500), placement.content_box, 480)
    assert back.shape == (300, 500) and back.dtype == np.uint8
    iou = (back & orig).sum() / (back | orig).sum()
    assert iou > 0.98
    # logits at a quarter of the output resolution, as a model head would give
    logits = np.where(canvas[::4, ::4] > 0, 5.0, -5.0).astype(np.float32)
    probs = prediction_to_original(logits, (300, 500), placement.content_box, 480)
    assert probs.dtype == np.float32 and probs.shape == (300, 500)
    iou = ((probs > 0) & (orig > 0)).sum() / ((probs > 0) | (orig > 0)).sum()
    assert iou > 0.95


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(8, 120), w=st.integers(8, 120), fy=st.floats(0.3, 2.5), fx=st.floats(0.3, 2.5),
    resample=st.sampled_from(["bilinear", "bicubic"]), seed=st.integers(0, 2**16),
)  # fmt: skip
@example(h=60, w=100, fy=1.09375, fx=1.1015625, resample="bilinear", seed=1)  # off by two in one pixel
def test_resize_pixels_is_pils_filter(h, w, fy, fx, resample, seed):
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5))
    size = (max(1, round(w * fx)), max(1, round(h * fy)))
    ours = resize_pixels(np.asarray(image), size, resample)  # a read-only array, as PIL hands out
    pil = np.asarray(image.resize(size, Image.Resampling[resample.upper()]))
    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    # the same filter weights; torch and PIL round their fixed-point sums differently, once in each of the
    # two separable passes, so a pixel can be off by two grey levels, and on average by far less than one
    error = np.abs(ours.astype(int) - pil)
    assert error.max() <= 2 and error.mean() < 0.5


def test_resize_pixels_rejects_an_unknown_filter():
    with pytest.raises(ValueError, match="unknown resample 'lanczos'"):
        resize_pixels(np.zeros((4, 4, 3), np.uint8), (2, 2), "lanczos")
