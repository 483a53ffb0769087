"""The lazy NeMo mosaic and the evaluation transform, on small rendered images with known masks."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nemo_hf import schema
from nemo_hf.masks import decode_rle, encode_rle
from nemo_hf.transforms.geometry import Placement, grid_cells
from nemo_hf.transforms.images import ImageTable
from nemo_hf.transforms.mosaic import EVAL_COLUMNS, OUTPUT_COLUMNS, EvalTransform, NeMoMosaic, explode_sentences
from nemo_hf.transforms.sampling import Warmup, spatial_quadrants
from nemo_hf.transforms.sampling import draw_mode as _draw_mode, normalise_p as _normalised

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "images"  # ../shared beside the checkout
RED = (230, 20, 20)


# ---------------------------------------------------------------- fixtures: images with a red object


def object_mask(w: int, h: int, seed: int) -> np.ndarray:
    """An ellipse or rectangle somewhere in the image, at least one pixel."""
    rng = np.random.default_rng(seed)
    x0, y0 = rng.integers(0, w), rng.integers(0, h)
    x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        mask[y0:y1, x0:x1] = 1
    else:
        yy, xx = np.mgrid[:h, :w]
        cy, cx, ry, rx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        mask[y0, x0 + (x1 - x0) // 2] = 1
    return mask


def object_image(mask: np.ndarray, seed: int = 0) -> Image.Image:
    """Smooth blue/green background, the masked object red: pixels show where the mask belongs."""
    h, w = mask.shape
    yy, xx = np.mgrid[:h, :w]
    shade = (seed * 37) % 80
    pixels = np.stack([20 + 0 * xx, 90 + shade + 60 * xx / max(w, 1), 140 + 80 * yy / max(h, 1)], -1)
    pixels[mask > 0] = RED
    return Image.fromarray(pixels.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}) | kwargs)
    return buffer.getvalue()


def ref_row(ref_id, image_id, mask, sentences=("the red thing",), negatives=None, split="train") -> dict:
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)] if xs.size else [0.0] * 4
    n = len(sentences)
    negatives = negatives if negatives is not None else [[] for _ in range(n)]
    return {
        "ref_id": ref_id,
        "ann_id": ref_id + 1000,
        "image_id": image_id,
        "file_name": f"COCO_train2014_{image_id:012d}.jpg",
        "category_id": 1,
        "category": "thing",
        "split": split,
        "sentences": [
            {"sent_id": ref_id * 10 + k, "sent": s, "raw": s, "tokens": s.split()} for k, s in enumerate(sentences)
        ],
        "bbox": bbox,
        "mask": encode_rle(mask),
        "negatives": negatives,
        "negative_scores": [[0.5] * len(neg) for neg in negatives],
        "negative_fallback": [False] * n,
    }


def batch_of(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


def render_one(transform, row: dict) -> dict:
    out = transform(batch_of([row]))
    return {key: values[0] for key, values in out.items()}


def image_objects(image_id: int, mask: np.ndarray) -> list[dict]:
    """The image's objects column: its referred object (ann_id image_id + 1000, as `ref_row`) and an unreferred
    strip along the bottom-right edges that overlaps nothing (a 'person')."""
    h, w = mask.shape
    other = np.zeros_like(mask)
    other[h - 3 :, w // 2 :] = 1
    other[h // 2 :, w - 2 :] = 1
    other &= 1 - mask
    return [
        {"ann_id": image_id + 1000, "category_id": 1, "category": "thing", "supercategory": "stuff",
         "bbox": ref_row(image_id, image_id, mask)["bbox"], "area": float(mask.sum()), "iscrowd": False,
         "mask": encode_rle(mask)},
        {"ann_id": image_id + 5000, "category_id": 2, "category": "person", "supercategory": "person",
         "bbox": [float(w // 2), float(h // 2), float(w - w // 2), float(h - h // 2)], "area": float(other.sum()),
         "iscrowd": image_id % 2 == 1, "mask": encode_rle(other)},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world():
    """12 JPEG images (sizes vary) in an images Dataset, 8 training refs with mined negatives, 2 val refs."""
    sizes = [(64, 48), (48, 64), (80, 40), (50, 50), (70, 52), (33, 61)] * 2
    masks = [object_mask(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    blobs = [encode(object_image(m, seed=i)) for i, m in enumerate(masks)]
    n = len(blobs)
    pools = [["refcoco_unc"] if i < 10 else [] for i in range(n)]  # images 10, 11: val images, in no pool
    images = datasets.Dataset.from_dict(
        {
            "image_id": list(range(n)),
            "file_name": [f"COCO_train2014_{i:012d}.jpg" for i in range(n)],
            "width": [w for w, _ in sizes],
            "height": [h for _, h in sizes],
            "license": [1] * n,
            "image": [{"bytes": b, "path": None} for b in blobs],
            "negative_pool_of": pools,
            "objects": [image_objects(i, m) for i, m in enumerate(masks)],
        },
        features=schema.IMAGES_FEATURES,
    )
    rows = [
        ref_row(r, r, masks[r], ("the red thing", "red object on the left"), [[(r + k) % 10 for k in range(1, 7)]] * 2)
        for r in range(8)
    ]
    rows += [ref_row(r, r, masks[r], ("the val thing",), split="val") for r in (10, 11)]
    refs = datasets.Dataset.from_list(rows, features=schema.REFS_FEATURES)
    return {"images": images, "refs": refs, "rows": rows, "masks": masks, "blobs": blobs}


# ---------------------------------------------------------------- properties of a rendered sample


def check_sample(out: dict, source_mask: np.ndarray, output_size: int, tile: str, check_pixels: bool = True) -> None:
    """Mask only inside the target's content rect, exactly the nearest-neighbour sampling of the source mask,
    area scaled by the tile's scale factors, a tight box around it, and red pixels where the mask is."""
    image = np.asarray(out["image"])
    mask = out["mask"]
    assert image.shape == (output_size, output_size, 3) and image.dtype == np.uint8
    assert mask.shape == (output_size, output_size) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    h, w = source_mask.shape
    quadrant = out["target_quadrant"]
    cell = (0, 0, output_size, output_size) if quadrant == -1 else grid_cells(output_size)[quadrant]
    placement = Placement.fit((w, h), cell, tile)
    x0, y0, x1, y1 = placement.content_box
    outside = mask.copy()
    outside[y0:y1, x0:x1] = 0
    assert not outside.any(), "mask outside the target tile"
    rows, cols = placement.source_rows_cols()
    np.testing.assert_array_equal(mask[y0:y1, x0:x1], source_mask[np.ix_(rows, cols)])
    expected_area = source_mask.sum() * placement.scale_x * placement.scale_y
    bx, by, bw, bh = out["bbox"]
    assert abs(int(mask.sum()) - expected_area) <= 2 * (bw + bh) + 4
    if mask.any():
        ys, xs = np.nonzero(mask)
        assert [bx, by, bw, bh] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # Output pixels sampling the source deep inside the object (beyond the resampling kernel) are red.
    radius = int(np.ceil(max(1 / placement.scale_x, 1 / placement.scale_y, 1))) + 1
    deep = eroded(source_mask, radius)[np.ix_(rows, cols)].astype(bool)
    if check_pixels and deep.any():
        content = image[y0:y1, x0:x1]
        red = (content[..., 0] > 150) & (content[..., 2] < 110)
        assert red[deep].all(), "the image does not show the object where the mask is"


def eroded(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose whole (2r+1)^2 neighbourhood is in the mask."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


@settings(max_examples=30, deadline=None)
@given(
    w=st.integers(8, 120),
    h=st.integers(8, 120),
    output_size=st.integers(16, 97),
    tile=st.sampled_from(["squash", "letterbox"]),
    ref_id=st.integers(0, 10**9),
    seed=st.integers(0, 1000),
    mode=st.sampled_from(["single", "random", "retrieval"]),
)
def test_mask_box_and_pixels_follow_the_target(w, h, output_size, tile, ref_id, seed, mode):
    mask = object_mask(w, h, seed)
    images = {1: encode(object_image(mask), "PNG")}
    for i in range(2, 6):
        images[i] = encode(object_image(object_mask(30, 20, i), seed=i))
    row = ref_row(ref_id, 1, mask, negatives=[[2, 3, 4, 5]])
    transform = NeMoMosaic(images, output_size=output_size, p={mode: 1.0}, tile=tile, seed=seed, pool=[2, 3, 4, 5])
    out = render_one(transform, row)
    assert out["mode"] == mode
    assert out["notes"] == ([] if out["mask"].any() else ["target mask is empty"])  # thin objects can vanish
    check_sample(out, mask, output_size, tile)
    if mode != "single":
        assert out["tile_image_ids"][out["target_quadrant"]] == 1
        assert sorted(out["tile_image_ids"]) == [1] + sorted(set(out["tile_image_ids"]) - {1})  # no repeats
    assert render_one(transform, row)["image"].tobytes() == out["image"].tobytes()  # reproducible


def test_output_columns_and_types(world):
    transform = NeMoMosaic(world["images"], output_size=96, p={"retrieval": 1.0}, return_arrays=True)
    out = world["refs"].with_transform(transform)[:3]
    assert tuple(out) == OUTPUT_COLUMNS
    assert all(isinstance(img, np.ndarray) and img.shape == (96, 96, 3) and img.flags.writeable for img in out["image"])
    assert all(m in {"retrieval"} for m in out["mode"])
    assert all(len(ids) == 4 for ids in out["tile_image_ids"])
    for row, sentence in zip(world["rows"], out["sentence"]):
        assert sentence in [s["sent"] for s in row["sentences"]]
    pil = NeMoMosaic(world["images"], output_size=96, p={"retrieval": 1.0})(batch_of(world["rows"][:3]))["image"]
    assert all(isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (96, 96) for img in pil)
    # PIL output is rendered in PIL's own 4-byte layout, arrays in RGB: the same pixels
    assert [np.asarray(img).tobytes() for img in pil] == [img.tobytes() for img in out["image"]]


def test_each_tile_shows_its_own_image():
    """Sources of many sizes, decoded one after another: each tile shows its own image, never a neighbour's."""
    sizes = {1: (64, 48), 2: (300, 200), 3: (40, 90), 4: (640, 480), 5: (50, 50), 6: (120, 80)}
    colours = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 4: (200, 200, 30), 5: (30, 200, 200), 6: (90, 90, 90)}
    images = {i: encode(Image.new("RGB", sizes[i], colours[i])) for i in sizes}
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 10:30] = 1
    transform = NeMoMosaic(images, output_size=96, p={"retrieval": 1.0}, return_arrays=True)
    seen = set()
    for ref_id in range(12):
        out = render_one(transform, ref_row(ref_id, 1, mask, negatives=[[2, 3, 4, 5, 6]]))
        for (x, y, w, h), image_id in zip(grid_cells(96), out["tile_image_ids"]):
            tile = out["image"][y : y + h, x : x + w].reshape(-1, 3).astype(int)
            assert np.abs(tile - colours[image_id]).max() <= 6, f"ref {ref_id}: tile of image {image_id}"
            seen.add(image_id)
    assert seen == set(sizes)


def negatives_by_epoch(transform, rows, epochs):
    """(row, its three negative tile ids) for every row, rendered at epochs 0 .. epochs - 1."""
    for epoch in range(epochs):
        transform.set_epoch(epoch)
        out = transform(batch_of(rows))
        for row, ids, q in zip(rows, out["tile_image_ids"], out["target_quadrant"]):
            yield row, ids[:q] + ids[q + 1 :]


def test_retrieval_negatives_come_from_the_sentence_list_without_replacement(world):
    transform = NeMoMosaic(world["images"], output_size=64, p={"retrieval": 1.0})
    drawn_for_ref0 = set()
    for row, negatives in negatives_by_epoch(transform, world["rows"][:8], epochs=4):
        assert len(set(negatives)) == 3 and set(negatives) <= set(row["negatives"][0])
        assert row["image_id"] not in negatives
        if row["ref_id"] == 0:
            drawn_for_ref0 |= set(negatives)
    assert len(drawn_for_ref0) > 3  # sampled from the top K, not always the first three


def test_exploded_rows_keep_their_sentence(world):
    exploded = explode_sentences(world["refs"].select(range(2)))
    transform = NeMoMosaic(world["images"], output_size=48, p={"retrieval": 1.0}, spatial_words=True)
    out = exploded.with_transform(transform)[:]
    assert out["sentence"] == exploded["sentence"] and out["sent_id"] == exploded["sent_id"]
    on_the_left = [q for q, s in zip(out["target_quadrant"], out["sentence"]) if "left" in s]
    assert on_the_left and set(on_the_left) <= {0, 2}


def test_random_mode_uses_the_configs_training_pool_only(world):
    transform = NeMoMosaic(world["images"], output_size=64, p={"random": 1.0}, config="refcoco_unc")
    seen = set()
    for row, negatives in negatives_by_epoch(transform, world["rows"][:8], epochs=6):
        assert len(set(negatives)) == 3 and row["image_id"] not in negatives
        seen |= set(negatives)
    assert seen <= set(range(10)) and len(seen) >= 8  # never the val images 10, 11
    with pytest.raises(ValueError, match="unknown config"):
        NeMoMosaic(world["images"], config="refcoco_xyz")


def test_random_pool_needs_a_config_when_the_table_serves_several(world):
    images = world["images"].map(lambda r: {"negative_pool_of": r["negative_pool_of"] + ["refcocog_umd"]})
    transform = NeMoMosaic(images, output_size=32, p={"random": 1.0})
    with pytest.raises(ValueError, match="pass config="):
        transform(batch_of(world["rows"][:1]))
    assert NeMoMosaic(images, output_size=32, p={"random": 1.0}, config="refcocog_umd")(batch_of(world["rows"][:1]))


def test_an_image_table_keeps_its_own_config_and_pool(world):
    table = ImageTable(world["images"], config="refcoco_unc")
    assert NeMoMosaic(table, output_size=32, config="refcoco_unc").images is table
    with pytest.raises(ValueError, match="ImageTable for config 'refcoco_unc'"):  # would draw refcoco_unc's pool
        NeMoMosaic(table, output_size=32, config="refcocog_umd")
    with pytest.raises(ValueError, match="pool=given"):
        EvalTransform(table, output_size=32) and NeMoMosaic(table, output_size=32, pool=[1, 2, 3])


def test_epochs_differ_seeds_reproduce(world):
    rows = batch_of(world["rows"][:8])

    def draw(seed, epoch):
        transform = NeMoMosaic(world["images"], output_size=64, p={"single": 1, "retrieval": 2}, seed=seed)
        transform.set_epoch(epoch)
        out = transform(rows)
        return list(zip([img.tobytes() for img in out["image"]], out["sentence"], map(tuple, out["tile_image_ids"])))

    assert draw(0, 0) == draw(0, 0)
    assert draw(0, 0) != draw(0, 1)
    assert draw(0, 0) != draw(1, 0)
    assert sum(a != b for a, b in zip(draw(0, 0), draw(0, 1))) >= 4


def test_modes_are_drawn_with_their_probabilities():
    rng = np.random.default_rng(0)
    p = _normalised({"single": 1, "retrieval": 4})
    counts = Counter(_draw_mode(rng, p) for _ in range(20_000))
    assert set(counts) == {"single", "retrieval"}  # never a mode of probability zero
    assert abs(counts["single"] / 20_000 - 0.2) < 0.015


def test_warmup_schedule_is_random_only_before_the_switch(world):
    transform = NeMoMosaic(world["images"], output_size=32, p={"retrieval": 1.0}, schedule=Warmup(epochs=2))
    rows = batch_of(world["rows"][:8])
    for epoch, modes in [(0, {"random"}), (1, {"random"}), (2, {"retrieval"})]:
        transform.set_epoch(epoch)
        assert set(transform(rows)["mode"]) == modes
    modes = []
    for seed in range(6):
        half = NeMoMosaic(world["images"], 32, p={"retrieval": 1}, seed=seed, schedule=Warmup(epochs=1, p_random=0.5))
        modes += half(rows)["mode"]
    assert set(modes) == {"single", "random"}
    assert "Warmup(epochs=1, p_random=0.5)" in repr(half)
    with pytest.raises(ValueError, match="unknown modes"):
        NeMoMosaic(world["images"], p={"mosaic": 1.0})


def test_spatial_words_constrain_the_quadrant():
    assert spatial_quadrants("the man on the left".split()) == [0, 2]
    assert spatial_quadrants("top left corner".split()) == [0]
    assert spatial_quadrants("bottom right".split()) == [3]
    assert spatial_quadrants("guy under the table".split()) == [2, 3]
    assert spatial_quadrants("left of the right one".split()) == [0, 1, 2, 3]  # contradictory
    assert spatial_quadrants("leftover pizza".split()) == [0, 1, 2, 3]  # whole words only
    mask = object_mask(40, 30, 0)
    images = {i: encode(object_image(mask, seed=i)) for i in range(5)}
    transform = NeMoMosaic(images, output_size=32, p={"random": 1.0}, pool=[1, 2, 3, 4], spatial_words=True)
    for sentence, allowed in [("dog on the left", {0, 2}), ("top right cat", {1}), ("the thing", {0, 1, 2, 3})]:
        rows = [ref_row(r, 0, mask, (sentence,)) for r in range(40)]
        quadrants = set(transform(batch_of(rows))["target_quadrant"])
        assert quadrants == allowed


def test_eval_rows_are_never_mosaicked(world):
    transform = NeMoMosaic(world["images"], output_size=48, p={"retrieval": 1.0})
    out = transform(batch_of(world["rows"][8:]))
    assert out["mode"] == ["single", "single"] and out["target_quadrant"] == [-1, -1]
    assert all("never mosaicked" in notes[0] for notes in out["notes"])


def dataloader_rows(dataset, num_workers, **kwargs):
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=list, **kwargs)
    rows = [row for batch in loader for row in batch]
    return [(row["ref_id"], row["image"].tobytes(), row["mask"].tobytes(), row["sentence"]) for row in rows]


def test_dataloader_workers_give_identical_bytes_and_follow_the_epoch(world):
    from nemo_hf.transforms.mosaic import MosaicEpochCallback
    from transformers import TrainerControl, TrainerState

    transform = NeMoMosaic(world["images"], output_size=64, p={"single": 1, "retrieval": 2}, return_arrays=True)
    refs = world["refs"].with_transform(transform)
    in_process = dataloader_rows(refs, 0)
    assert dataloader_rows(refs, 2) == in_process

    callback = MosaicEpochCallback(transform)
    callback.on_epoch_begin(None, TrainerState(epoch=1.0), TrainerControl())
    assert transform.epoch == 1
    with_workers = dataloader_rows(refs, 2, persistent_workers=False)
    assert with_workers != in_process
    assert with_workers == dataloader_rows(refs, 0)


def test_trainer_with_workers_sees_a_new_draw_every_epoch(world, tmp_path):
    import torch
    from nemo_hf.transforms.mosaic import MosaicEpochCallback
    from transformers import Trainer, TrainingArguments

    transform = NeMoMosaic(world["images"], output_size=32, p={"retrieval": 1.0}, return_arrays=True)
    refs = world["refs"].select(range(8)).with_transform(transform)

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, ref_id, digest):
            self.seen.append(dict(zip(ref_id.tolist(), digest.tolist())))
            return {"loss": (self.weight**2).sum() + 1.0}

    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, dataloader_num_workers=2,
        remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
    )  # fmt: skip
    model = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=refs, data_collator=collate_digests)
    trainer.add_callback(MosaicEpochCallback(transform))
    trainer.train()
    assert len(model.seen) == 2 and model.seen[0] != model.seen[1]
    for epoch, seen in enumerate(model.seen):
        transform.set_epoch(epoch)
        expected = transform(batch_of(world["rows"][:8]))
        assert seen == {r: digest_of(img) for r, img in zip(expected["ref_id"], expected["image"])}


def digest_of(image: np.ndarray) -> int:
    import zlib

    return zlib.crc32(np.ascontiguousarray(image).tobytes())


def collate_digests(rows):
    import torch

    return {
        "ref_id": torch.tensor([row["ref_id"] for row in rows]),
        "digest": torch.tensor([digest_of(row["image"]) for row in rows]),
    }


def test_image_table_reads_views_chunks_and_paths(world, tmp_path):
    images, blobs = world["images"], world["blobs"]
    view = images.shuffle(seed=3).select(range(9))  # an indices mapping that leaves three images out
    shown = set(view["image_id"])
    table = ImageTable(view)
    assert [table.bytes_of(i) for i in range(12)] == [blobs[i] if i in shown else None for i in range(12)]
    # several Arrow chunks, and a cell that holds a path instead of bytes: refused, the path never opened
    # (a row must not make a reader open a file it names: issue 23.3)
    (tmp_path / "7.jpg").write_bytes(blobs[7])
    tail = datasets.Dataset.from_dict(
        {**images.select([7]).to_dict(), "image_id": [99], "image": [{"bytes": None, "path": str(tmp_path / "7.jpg")}]},
        features=images.features,
    )
    table = ImageTable(datasets.concatenate_datasets([images.select(range(6)).flatten_indices(), images.select(range(6, 12)), tail]))
    assert len(table._dataset_index()) == 13 and len(table._cells) >= 2
    assert [table.bytes_of(i) for i in range(12)] == blobs
    with pytest.raises(ValueError, match=r"image 99: its row has no bytes but a path \('.*7.jpg'\), which is never read"):
        table.bytes_of(99)


def test_streaming_map_matches_set_transform(world):
    transform = NeMoMosaic(world["images"], output_size=48, p={"retrieval": 1.0}, return_arrays=True)
    streamed = list(world["refs"].to_iterable_dataset().map(transform, batched=True, batch_size=4))
    direct = transform(batch_of(world["rows"]))
    assert [row["image"].tobytes() for row in streamed] == [img.tobytes() for img in direct["image"]]
    assert [row["tile_image_ids"] for row in streamed] == direct["tile_image_ids"]


def test_pickle_carries_no_index_and_repr_reads(world):
    transform = NeMoMosaic(world["images"], output_size=32, config="refcoco_unc")
    before = transform(batch_of(world["rows"][:2]))
    assert transform.images._index is not None
    clone = pickle.loads(pickle.dumps(transform))
    assert clone.images._index is None and clone.images._cells is None
    after = clone(batch_of(world["rows"][:2]))
    assert [i.tobytes() for i in after["image"]] == [i.tobytes() for i in before["image"]]
    text = repr(transform)
    assert text.startswith("NeMoMosaic(images=<Dataset of 12 images>, output_size=32")
    assert "config='refcoco_unc'" in text


def test_import_does_not_need_transformers():
    code = "import sys, nemo_hf.transforms.mosaic; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- evaluation


def test_explode_sentences_gives_one_row_per_sentence(world):
    exploded = explode_sentences(world["refs"])
    assert len(exploded) == sum(len(r["sentences"]) for r in world["rows"])
    assert exploded.features["sentence"] == datasets.Value("string")
    assert set(world["refs"].column_names) < set(exploded.column_names)
    assert [(r["ref_id"], r["sent_id"]) for r in exploded.select_columns(["ref_id", "sent_id"])] == [
        (row["ref_id"], s["sent_id"]) for row in world["rows"] for s in row["sentences"]
    ]
    streamed = list(explode_sentences(world["refs"].to_iterable_dataset()))
    assert [r["sentence"] for r in streamed] == exploded["sentence"]


@pytest.mark.parametrize("tile", ["squash", "letterbox"])
def test_eval_transform_renders_each_sentence_and_maps_back(world, tile):
    exploded = explode_sentences(world["refs"].select(range(3)))
    transform = EvalTransform(world["images"], output_size=50, tile=tile, return_arrays=True)
    out = exploded.with_transform(transform)[:]
    assert tuple(out) == EVAL_COLUMNS
    assert out["sentence"] == exploded["sentence"] and out["mode"] == ["eval"] * len(exploded)
    for row_index, ref_id in enumerate(out["ref_id"]):
        row = world["rows"][ref_id]
        mask = world["masks"][row["image_id"]]
        sample = {key: values[row_index] for key, values in out.items()}
        check_sample(sample, mask, 50, tile)
        assert sample["orig_size"] == list(mask.shape)
        assert np.array_equal(decode_rle(sample["orig_mask"]), mask)  # ground truth at original size
        back = transform.to_original(sample["mask"], sample["orig_size"], sample["content_box"])
        assert back.shape == mask.shape
        if tile == "letterbox":
            x0, y0, x1, y1 = sample["content_box"]
            assert abs((x1 - x0) / (y1 - y0) - mask.shape[1] / mask.shape[0]) < 0.1
    with pytest.raises(ValueError, match="explode_sentences"):
        transform(batch_of(world["rows"][:1]))


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"{REALDATA} (a real COCO image + mask) not found beside the checkout")
@pytest.mark.parametrize("tile", ["squash", "letterbox"])
def test_real_coco_image_and_mask(tile):
    data = (REALDATA / "img_44266.jpg").read_bytes()
    mask = (np.asarray(Image.open(REALDATA / "mask_44266.png")) > 0).astype(np.uint8)
    others = {
        i: (REALDATA / name).read_bytes()
        for i, name in enumerate(["img_80472.jpg", "COCO_train2014_000000519404.jpg", "000000397133.jpg"], start=2)
    }
    row = ref_row(7, 1, mask, ("wooden chair",), negatives=[[2, 3, 4]])
    mosaic = NeMoMosaic({1: data, **others}, output_size=480, p={"retrieval": 1.0}, tile=tile)
    out = render_one(mosaic, row)
    placement = Placement.fit((640, 480), grid_cells(480)[out["target_quadrant"]], tile)
    rows, cols = placement.source_rows_cols()
    x0, y0, x1, y1 = placement.content_box
    np.testing.assert_array_equal(out["mask"][y0:y1, x0:x1], mask[np.ix_(rows, cols)])
    # The tile shows the image as a full-size decode + resize would, and the mask sits on the wooden chair.
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    content = np.asarray(out["image"])[y0:y1, x0:x1].astype(float)
    assert np.abs(content - np.asarray(full)).mean() < 4
    source = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    chair, rest = source[mask > 0].mean(0), source[mask == 0].mean(0)
    under_mask = content[out["mask"][y0:y1, x0:x1] > 0].mean(0)
    assert np.abs(under_mask - chair).max() < 4 and np.abs(chair - rest).max() > 10

    evaluate = EvalTransform({1: data}, output_size=480, tile=tile)
    sample = render_one(evaluate, {**row, "sentence": "wooden chair", "sent_id": 70})
    assert sample["orig_size"] == [480, 640]
    back = evaluate.to_original(sample["mask"], sample["orig_size"], sample["content_box"])
    assert (back & mask).sum() / (back | mask).sum() > 0.97


def test_preview_draws_masks_boxes_and_captions(world):
    from nemo_hf.inspection.preview import render_preview

    sheet = render_preview(world["refs"], world["images"], n=4, output_size=64, columns=2, seed=1)
    assert sheet.mode == "RGB" and sheet.width == 8 + 2 * (64 + 8) and sheet.height > 2 * (64 + 8)
    pixels = np.asarray(sheet).astype(int)
    box_yellow = (pixels[..., 0] > 240) & (pixels[..., 1] > 200) & (pixels[..., 2] < 40)
    dark_text = pixels.sum(-1) < 150
    half = sheet.height // 2
    for left in (8, 8 + 72):  # a box in each of the four mosaics, captions under the images
        assert box_yellow[:half, left : left + 64].any() and box_yellow[half:, left : left + 64].any()
    assert dark_text[72:half].sum() > 100


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small():
    mask = object_mask(40, 30, 3)
    images = {i: encode(object_image(mask, seed=i)) for i in range(1, 7)}
    return mask, images


def test_missing_and_unreadable_negatives_are_replaced(small):
    mask, images = small
    images = {**images, 9: b"not an image at all", 8: images[2][:300]}
    rows = [ref_row(r, 1, mask, negatives=[[77, 9, 8, 2, 3, 4]]) for r in range(12)]
    out = NeMoMosaic(images, output_size=40, p={"retrieval": 1.0}, pool=[2, 3, 4, 5])(batch_of(rows))
    assert all(sorted(ids) == [1, 2, 3, 4] for ids in out["tile_image_ids"])
    notes = " | ".join(note for notes in out["notes"] for note in notes)
    assert "negative 77 missing" in notes and "negative 9 unreadable" in notes and "negative 8 unreadable" in notes


def test_short_and_empty_negative_lists(small):
    mask, images = small
    transform = NeMoMosaic(images, output_size=40, p={"retrieval": 1.0}, pool=[4, 5, 6])
    out = render_one(transform, ref_row(1, 1, mask, negatives=[[2, 3]]))
    assert out["mode"] == "retrieval" and set(out["tile_image_ids"]) == {1, 2, 3}
    assert any("repeated" in n for n in out["notes"])
    out = render_one(transform, ref_row(1, 1, mask, negatives=[[]]))
    assert out["mode"] == "random" and set(out["tile_image_ids"]) == {1, 4, 5, 6}
    assert any("random mode" in n for n in out["notes"])
    out = render_one(NeMoMosaic(images, output_size=40, p={"retrieval": 1.0}), ref_row(1, 1, mask))
    assert out["mode"] == "single" and out["tile_image_ids"] == [1]
    assert any("random pool empty" in n for n in out["notes"])


def with_extraneous_bytes(jpeg: bytes) -> bytes:
    """A libjpeg warning that full decoders shrug off (a few COCO files have such quirks)."""
    start_of_scan = jpeg.index(b"\xff\xda")
    return jpeg[:start_of_scan] + b"\x00\x00\x00" + jpeg[start_of_scan:]


@pytest.mark.parametrize("variant", ["grayscale", "cmyk", "png_rgba", "palette_png", "libjpeg_warning"])
def test_unusual_sources_render(small, variant):
    mask, images = small
    image = object_image(mask)
    data = {
        "libjpeg_warning": lambda: with_extraneous_bytes(encode(image)),
        "grayscale": lambda: encode(image.convert("L")),
        "cmyk": lambda: encode(image.convert("CMYK")),
        "png_rgba": lambda: encode(image.convert("RGBA"), "PNG"),
        "palette_png": lambda: encode(image.convert("P"), "PNG"),
    }[variant]()
    transform = NeMoMosaic({**images, 1: data}, output_size=60, p={"random": 1.0}, pool=[2, 3, 4], tile="letterbox")
    out = render_one(transform, ref_row(5, 1, mask))
    arrays = NeMoMosaic({**images, 1: data}, 60, {"random": 1.0}, pool=[2, 3, 4], tile="letterbox", return_arrays=True)
    assert np.array_equal(render_one(arrays, ref_row(5, 1, mask))["image"], np.asarray(out["image"]))
    check_sample(out, mask, 60, "letterbox", check_pixels=variant != "grayscale")
    if variant == "grayscale":
        x0, y0, x1, y1 = Placement.fit((40, 30), grid_cells(60)[out["target_quadrant"]], "letterbox").content_box
        content = np.asarray(out["image"])[y0:y1, x0:x1]
        assert (content == content[..., :1]).all()  # grey, expanded to RGB


def test_exif_orientation_is_not_applied(small):
    mask, images = small
    image = object_image(mask)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated_tag = encode(image, exif=exif.tobytes())
    plain = encode(image)
    transform = NeMoMosaic({**images, 1: plain}, output_size=64, p={"single": 1.0})
    tagged = NeMoMosaic({**images, 1: rotated_tag}, output_size=64, p={"single": 1.0})
    row = ref_row(1, 1, mask)
    assert render_one(tagged, row)["image"].tobytes() == render_one(transform, row)["image"].tobytes()


def test_zero_area_mask_and_single_sentence(small):
    mask, images = small
    empty = np.zeros_like(mask)
    row = ref_row(3, 1, empty, ("only one sentence",), negatives=[[2, 3, 4]])
    row["bbox"] = [4.0, 3.0, 8.0, 6.0]
    out = render_one(NeMoMosaic(images, output_size=40, p={"retrieval": 1.0}), row)
    assert out["mask"].sum() == 0 and out["sentence"] == "only one sentence"
    assert "target mask is empty" in out["notes"]
    x, y, w, h = out["bbox"]
    cx, cy, _, _ = grid_cells(40)[out["target_quadrant"]]
    assert (x - cx, y - cy, w, h) == pytest.approx((2.0, 2.0, 4.0, 4.0))  # 40x30 -> 20x20 tile


def test_target_problems_name_the_image(small):
    mask, images = small
    transform = NeMoMosaic({**images, 1: b"garbage"}, output_size=40, pool=[2, 3, 4])
    with pytest.raises(ValueError, match="target image 1 cannot be read"):
        render_one(transform, ref_row(4, 1, mask))
    with pytest.raises(KeyError, match="target image 99 is not in the images table"):
        render_one(transform, ref_row(4, 99, mask))
    with pytest.raises(ValueError, match="ref 4 \\(image 2\\).*does not match"):
        render_one(transform, ref_row(4, 2, np.ones((10, 10), np.uint8)))
