"""``return_objects`` (every instance of every tile, mapped as the target) and the 3x3 grid."""

import numpy as np
import pytest
from PIL import Image

from nemo_hf.transforms.geometry import Placement, grid_cells
from nemo_hf.transforms.mosaic import EvalTransform, NeMoMosaic, explode_sentences
from nemo_hf.transforms.sampling import spatial_quadrants
from nemo_hf.masks import decode_rle
from test_mosaic import batch_of, encode, object_image, object_mask, ref_row, render_one, world  # noqa: F401


def check_objects(out: dict, images, output_size: int, tile: str, grid: int) -> None:
    """Every instance of every tile is there, sampled from its source RLE through its tile's placement;
    the target's equals the ``mask`` output and its box the ``bbox`` output."""
    single = out["target_quadrant"] == -1
    cells = [(0, 0, output_size, output_size)] if single else grid_cells(output_size, grid)
    expected = [(t, o["ann_id"]) for t, image_id in enumerate(out["tile_image_ids"]) for o in images.objects_of(image_id)]
    assert [(o["tile"], o["ann_id"]) for o in out["objects"]] == expected
    targets = [o for o in out["objects"] if o["is_target"]]
    assert len(targets) == 1
    target = targets[0]
    assert target["tile"] == (0 if single else out["target_quadrant"])
    np.testing.assert_array_equal(target["mask"], out["mask"])
    assert target["bbox"] == out["bbox"]
    for obj in out["objects"]:
        image_id = out["tile_image_ids"][obj["tile"]]
        (source,) = [o for o in images.objects_of(image_id) if o["ann_id"] == obj["ann_id"]]
        h, w = source["mask"]["size"]
        placement = Placement.fit((w, h), cells[obj["tile"]], tile)
        x0, y0, x1, y1 = placement.content_box
        rows, cols = placement.source_rows_cols()
        mask = obj["mask"]
        assert mask.shape == (output_size, output_size) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask[y0:y1, x0:x1], decode_rle(source["mask"])[np.ix_(rows, cols)])
        assert mask.sum() == mask[y0:y1, x0:x1].sum() == obj["area"]
        assert obj["category"] == source["category"] and obj["iscrowd"] == source["iscrowd"]


@pytest.mark.parametrize("grid", [2, 3])
@pytest.mark.parametrize("tile", ["squash", "letterbox"])
@pytest.mark.parametrize("mode", ["single", "random", "retrieval"])
def test_objects_follow_their_tiles_and_the_target_is_the_mask(world, grid, tile, mode):
    transform = NeMoMosaic(world["images"], output_size=61, p={mode: 1.0}, tile=tile, grid=grid,
                           config="refcoco_unc", return_objects=True, return_arrays=True)
    out = transform(batch_of(world["rows"][:8]))
    assert "objects" in out
    for i in range(8):
        sample = {key: values[i] for key, values in out.items()}
        assert sample["mode"] == mode
        n_tiles = 1 if mode == "single" else grid * grid
        assert len(sample["tile_image_ids"]) == n_tiles
        check_objects(sample, transform.images, 61, tile, grid)


@pytest.mark.parametrize("tile", ["squash", "letterbox"])
def test_eval_objects_and_rle_masks(world, tile):
    exploded = explode_sentences(world["refs"].select(range(3)))
    arrays = EvalTransform(world["images"], output_size=50, tile=tile, return_objects=True)
    rles = EvalTransform(world["images"], output_size=50, tile=tile, return_objects=True, object_masks="rle")
    as_arrays, as_rles = exploded.with_transform(arrays)[:], exploded.with_transform(rles)[:]
    assert list(as_arrays)[-1] == "objects"
    for i in range(len(exploded)):
        sample = {key: values[i] for key, values in as_arrays.items()}
        check_objects(sample, arrays.images, 50, tile, grid=1)
        for a, r in zip(sample["objects"], as_rles["objects"][i]):
            assert r["mask"]["size"] == [50, 50] and isinstance(r["mask"]["counts"], str)
            np.testing.assert_array_equal(decode_rle(r["mask"]), a["mask"])
            assert {k: v for k, v in r.items() if k != "mask"} == {k: v for k, v in a.items() if k != "mask"}


def test_a_target_missing_from_objects_is_taken_from_the_row(world):
    transform = NeMoMosaic(world["images"], output_size=40, p={"single": 1.0}, return_objects=True)
    row = dict(world["rows"][0], ann_id=77)
    out = render_one(transform, row)
    assert [o["ann_id"] for o in out["objects"]] == [1000, 5000, 77] and out["objects"][2]["is_target"]
    np.testing.assert_array_equal(out["objects"][2]["mask"], out["mask"])
    assert "target annotation 77 is not among image 0's objects" in out["notes"][-1]


def test_return_objects_needs_the_column(world):
    old = world["images"].remove_columns("objects")
    with pytest.raises(ValueError, match="objects' column.*rebuild"):
        NeMoMosaic(old, return_objects=True)
    with pytest.raises(ValueError, match="object_masks"):
        EvalTransform(world["images"], return_objects=True, object_masks="png")
    assert "objects" not in NeMoMosaic(old, output_size=32, p={"random": 1.0}, config="refcoco_unc")(
        batch_of(world["rows"][:1]))


def test_grid3_tiles_show_their_own_images_and_eight_distinct_negatives():
    colours = {i: tuple(int(v) for v in np.random.default_rng(i).integers(20, 235, 3)) for i in range(1, 12)}
    sizes = {i: (40 + 13 * i, 90 - 5 * i) for i in colours}
    images = {i: encode(Image.new("RGB", sizes[i], colours[i])) for i in colours}
    mask = np.zeros((sizes[1][1], sizes[1][0]), np.uint8)
    mask[10:20, 10:30] = 1
    transform = NeMoMosaic(images, output_size=95, p={"random": 1.0}, pool=list(range(2, 12)), grid=3,
                           return_arrays=True)
    targets = set()
    for ref_id in range(20):
        out = render_one(transform, ref_row(ref_id, 1, mask))
        ids = out["tile_image_ids"]
        assert len(ids) == 9 and ids[out["target_quadrant"]] == 1 and len(set(ids)) == 9 and not out["notes"]
        for (x, y, w, h), image_id in zip(grid_cells(95, 3), ids):
            cell = out["image"][y : y + h, x : x + w].reshape(-1, 3).astype(int)
            assert np.abs(cell - colours[image_id]).max() <= 6
        targets.add(out["target_quadrant"])
    assert len(targets) >= 6  # the target lands anywhere in the grid


def test_grid3_geometry_and_spatial_words():
    cells = grid_cells(417, 3)
    cover = np.zeros((417, 417), int)
    for x, y, w, h in cells:
        cover[y : y + h, x : x + w] += 1
    assert (cover == 1).all() and [c[2] for c in cells[:3]] == [139, 139, 139]
    assert grid_cells(480, 2) == [(0, 0, 240, 240), (240, 0, 240, 240), (0, 240, 240, 240), (240, 240, 240, 240)]
    assert spatial_quadrants("the man on the left".split(), 3) == [0, 3, 6]
    assert spatial_quadrants("top right cup".split(), 3) == [2]
    assert spatial_quadrants("dog below".split(), 3) == [6, 7, 8]
    assert spatial_quadrants("left and right".split(), 3) == list(range(9))
    assert spatial_quadrants("top left".split()) == [0]  # 2x2 unchanged
    with pytest.raises(ValueError, match="grid must be one of"):
        NeMoMosaic({}, grid=4)
    with pytest.raises(ValueError, match="at least 3 for a 3x3"):
        grid_cells(2, 3)


def test_grid_mix_gives_2x2_and_3x3_about_half_each_and_fixed_grids_draw_as_before():
    """snuviplab/NeMo dataloader.py:329-330 (``mix_grid``): after the warm-up every random or retrieval mosaic
    is 4 or 9 tiles, ``np.random.choice([4, 9], p=[0.5, 0.5])``; during it (lines 314-315) the random
    mosaics split the same way. Single stays one tile."""
    colours = {i: tuple(int(v) for v in np.random.default_rng(i).integers(20, 235, 3)) for i in range(1, 12)}
    images = {i: encode(Image.new("RGB", (40 + 3 * i, 50), colours[i])) for i in colours}
    mask = np.zeros((50, 43), np.uint8)
    mask[10:20, 10:30] = 1
    mix = NeMoMosaic(images, output_size=60, p={"random": 0.8, "single": 0.2}, pool=list(range(2, 12)),
                     grid="mix", return_arrays=True)
    assert "grid='mix'" in repr(mix)
    counts = {1: 0, 4: 0, 9: 0}
    for ref_id in range(1000):
        out = render_one(mix, ref_row(ref_id, 1, mask))
        n = len(out["tile_image_ids"])
        counts[n] += 1
        if n > 1:
            side = int(n**0.5)
            x, y, w, h = grid_cells(60, side)[out["target_quadrant"]]
            assert out["mask"][y : y + h, x : x + w].sum() == out["mask"].sum() > 0  # the mask sits in its cell
    mosaics = counts[4] + counts[9]
    assert abs(counts[1] - 200) < 45 and abs(counts[4] / mosaics - 0.5) < 0.06  # binomial: 4 sigma
    # a fixed grid draws nothing for the grid: its samples are those it gave before "mix" existed
    # (pinned with the code before "mix", commit 3616a8f)
    before = {2: [(0, [1, 10, 7, 8]), (0, [1, 2, 10, 7])],
              3: [(1, [10, 1, 7, 8, 4, 5, 6, 9, 3]), (2, [2, 10, 1, 7, 9, 3, 6, 8, 4])]}  # fmt: skip
    for grid, expected in before.items():
        fixed = NeMoMosaic(images, output_size=60, p={"random": 1.0}, pool=list(range(2, 12)), grid=grid,
                           return_arrays=True)
        outs = [render_one(fixed, ref_row(ref_id, 1, mask)) for ref_id in (5, 6)]
        assert [(o["target_quadrant"], o["tile_image_ids"]) for o in outs] == expected
    for bad in (4, 2.0, True, "3x3"):
        with pytest.raises(ValueError, match="grid must be one of"):
            NeMoMosaic(images, pool=[2], grid=bad)
