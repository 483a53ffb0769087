"""Looking at a built folder: `stats` (the similarity tau bounds, a previewed tau), `show` (one ref and its
negatives), `decode_mask`, and the PNGs they write, checked for what they show."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nemo_hf import decode_mask
from nemo_hf.folder import embeddings
from nemo_hf.cli import main
from nemo_hf.folder import BuildReport, MiningOptions, build_folder
from nemo_hf.inspection.show import DROPPED_FRAME, FRAME, KEPT_FRAME, show_ref
from nemo_hf.inspection.stats import PREVIEW_COLOUR, TAU_COLOUR, folder_stats
from nemo_hf.source.synthetic import make_refer_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_refer_source(tmp_path_factory.mktemp("inspect") / "src", n_images=20, seed=3, datasets=("refcoco",))


def _build(source, out, **mining):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DEMO EMBEDDER")
        options = MiningOptions(model="demo-random", top_k=4, embed_cache_dir=str(out.parent / "emb"), **mining)
        return build_folder(source, out, ["refcoco_unc"], mining=options)


@pytest.fixture(scope="module")
def folder(source, tmp_path_factory):
    """i2i with a low tau (p50), so the filter drops many candidates."""
    return _build(source, tmp_path_factory.mktemp("i2i") / "out", tau="p50")


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def _line_cosine(png, colour: str) -> float:
    """Where the vertical line of ``colour`` is in the tau panel, read off the PNG, as a cosine."""
    with Image.open(png) as image:
        geometry = json.loads(image.text["nemo_hf"])
        pixels = np.asarray(image.convert("RGB"))
    x0, y0, x1, y1 = geometry["tau_axes_px"]
    panel = np.all(pixels[int(y0) + 2 : int(y1) - 2, int(x0) : int(x1) + 1] == _hex(colour), axis=-1)
    columns = np.flatnonzero(panel.mean(axis=0) > 0.8)  # a vertical line over the whole panel height
    assert columns.size, f"no {colour} line in the tau panel"
    assert columns.max() - columns.min() <= 3  # one line
    (low, high) = geometry["xlim"]
    x = int(x0) + columns.mean() + 0.5
    return low + (x - x0) / (x1 - x0) * (high - low), (high - low) / (x1 - x0)


def _i2i_pairs(folder, config="refcoco_unc"):
    """Independently of stats: every i2i cosine of a training sentence's image to the pool."""
    kept = embeddings.read(folder, config)
    report = BuildReport.read(folder)
    table = pq.read_table(folder / report.configs["images"]["splits"]["train"]["shards"][0])
    pool = [i for i, pools in zip(table["image_id"].to_pylist(), table["negative_pool_of"].to_pylist()) if config in pools]
    row = {i: r for r, i in enumerate(kept.image_ids)}
    values = [
        float(kept.images[row[own]] @ kept.images[row[p]]) for own in kept.sent_image_ids for p in pool if p != own
    ]
    return np.array(values)


def test_stats_draws_the_i2i_distribution_with_tau_where_the_build_resolved_it(folder, tmp_path):
    png = tmp_path / "stats.png"
    report = folder_stats(folder, "refcoco_unc", png, sample=10_000)
    tau = BuildReport.read(folder).configs["refcoco_unc"]["mining"]["tau_cosine"]
    at, pixel = _line_cosine(png, TAU_COLOUR)
    assert at == pytest.approx(tau, abs=1.5 * pixel)
    pairs = _i2i_pairs(folder)
    assert f"build tau p50 = {tau:.4f} drops {100 * (pairs > tau).mean():.2f}% of these pairs" in report
    assert f"({len(embeddings.read(folder, 'refcoco_unc').sent_ids)} sampled sentences, {pairs.size} pairs)" in report


def test_stats_previews_another_tau_without_rebuilding(folder, tmp_path):
    png = tmp_path / "preview.png"
    report = folder_stats(folder, "refcoco_unc", png, tau=0.5)
    at, pixel = _line_cosine(png, PREVIEW_COLOUR)
    assert at == pytest.approx(0.5, abs=1.5 * pixel)
    assert "preview tau 0.5 = 0.5000 drops" in report
    # a tau below every pair drops everything: every sampled sentence falls back
    everything = folder_stats(folder, "refcoco_unc", tmp_path / "all.png", tau=-1.0)
    assert "drops 100.00% of these pairs" in everything
    sentences = len(embeddings.read(folder, "refcoco_unc").sent_ids)
    assert f"tau -1.0: {sentences} fallbacks" in everything


def test_stats_in_t2i_mode_draws_the_t2i_distribution(source, tmp_path):
    folder = _build(source, tmp_path / "out", tau="p90", mode="t2i")
    png = tmp_path / "t2i.png"
    report = folder_stats(folder, "refcoco_unc", png)
    tau = BuildReport.read(folder).configs["refcoco_unc"]["mining"]["tau_cosine"]
    at, pixel = _line_cosine(png, TAU_COLOUR)
    assert at == pytest.approx(tau, abs=1.5 * pixel)
    assert "t2i cosine of pool images" in report
    assert "i2i cosine" not in report


def test_stats_on_an_unmined_folder_says_so(source, tmp_path, capsys):
    folder = build_folder(source, tmp_path / "out", ["refcoco_unc"], mining=None)
    assert main(["stats", str(folder), "-o", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "refcoco_unc was built with --no-mining: it has no negatives" in out
    assert "with mined negatives" not in out
    assert main(["stats", str(folder), "--tau", "0.5", "-o", str(tmp_path / "s.png")]) == 2
    assert "no tau to preview" in capsys.readouterr().err


def test_stats_on_a_refer_source_says_so(source, capsys):
    assert main(["stats", str(source)]) == 2
    err = capsys.readouterr().err
    assert "is a refer source, not a built folder" in err and f"nemo-hf build --source {source}" in err


def _frame_corners(pixels: np.ndarray, colour) -> int:
    """Frames of ``colour`` on the sheet: each has one outer top-left corner pixel."""
    on = np.all(pixels == colour, axis=-1)
    left = np.zeros_like(on)
    left[:, 1:] = on[:, :-1]
    above = np.zeros_like(on)
    above[1:] = on[:-1]
    return int((on & ~left & ~above).sum())


def _thumbnail_pixels(folder, image_id: int, side: int) -> np.ndarray:
    report = BuildReport.read(folder)
    table = pq.read_table(folder / report.configs["images"]["splits"]["train"]["shards"][0], filters=[("image_id", "=", image_id)])
    with Image.open(io.BytesIO(table["image"][0].as_py()["bytes"])) as image:
        image = image.convert("RGB")
    image.thumbnail((side, side))
    return np.asarray(image)


def _train_row(folder, index=0):
    report = BuildReport.read(folder)
    table = pq.read_table(folder / report.configs["refcoco_unc"]["splits"]["train"]["shards"][0])
    return table.to_pylist()[index]


def test_show_draws_each_negative_with_its_scores(folder, tmp_path, capsys):
    row = _train_row(folder)
    png = tmp_path / "show.png"
    assert main(["show", str(folder), "--config", "refcoco_unc", "--ref-id", str(row["ref_id"]), "-o", str(png)]) == 0
    text = capsys.readouterr().out
    shown = show_ref(folder, "refcoco_unc", ref_id=row["ref_id"])
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    negatives = [n for per_sentence in row["negatives"] for n in per_sentence]
    assert _frame_corners(pixels, KEPT_FRAME) == len(negatives)  # one thumbnail per negative shown
    assert _frame_corners(pixels, DROPPED_FRAME) == 0
    for sentence, ids, scores in zip(row["sentences"], row["negatives"], row["negative_scores"]):
        tiles = shown.tiles[sentence["sent_id"]]
        assert [t.image_id for t in tiles] == ids
        assert [t.t2i for t in tiles] == scores
        for tile, image_id, score in zip(tiles, ids, scores):
            assert f"#{image_id} t2i {score:.3f} i2i {tile.i2i:.3f}" in text
        x0, y0, x1, y1 = tiles[0].box  # the thumbnail shows that image
        expected = _thumbnail_pixels(folder, ids[0], x1 - x0 - 2 * FRAME)
        inner = pixels[y0 + FRAME : y1 - FRAME, x0 + FRAME : x1 - FRAME]
        h, w = expected.shape[:2]
        top, left = (inner.shape[0] - h) // 2, (inner.shape[1] - w) // 2
        assert np.abs(inner[top : top + h, left : left + w].astype(int) - expected).mean() < 2
    assert f"{row['sentences'][0]['sent_id']}: \u201c{row['sentences'][0]['sent']}\u201d" in text
    report = BuildReport.read(folder)
    images = pq.read_table(folder / report.configs["images"]["splits"]["train"]["shards"][0]).to_pylist()
    objects = next(image["objects"] for image in images if image["image_id"] == row["image_id"])
    same = [o for o in objects if o["category_id"] == row["category_id"] and o["ann_id"] != row["ann_id"]]
    assert f"other annotated {row['category']} objects in this image: {len(same)}" in text


def test_show_all_marks_the_candidates_tau_dropped(folder, tmp_path):
    row = _train_row(folder)
    sent_id = row["sentences"][0]["sent_id"]
    shown = show_ref(folder, "refcoco_unc", sent_id=sent_id, show_all=True)
    tau = BuildReport.read(folder).configs["refcoco_unc"]["mining"]["tau_cosine"]
    tiles = shown.tiles[sent_id]
    assert list(shown.tiles) == [sent_id]  # that sentence alone
    dropped = [t for t in tiles if t.dropped]
    assert dropped and all(t.i2i > tau for t in dropped)  # p50: the walk meets dropped candidates
    assert [t.image_id for t in tiles if not t.dropped] == row["negatives"][0]  # the survivors are the negatives
    assert [t.t2i for t in tiles] == sorted((t.t2i for t in tiles), reverse=True)
    pixels = np.asarray(shown.image)
    assert _frame_corners(pixels, DROPPED_FRAME) == len(dropped)
    assert _frame_corners(pixels, KEPT_FRAME) == len(tiles) - len(dropped)


def test_show_a_val_ref_and_the_mask_outline(folder):
    report = BuildReport.read(folder)
    val = pq.read_table(folder / report.configs["refcoco_unc"]["splits"]["val"]["shards"][0]).to_pylist()[0]
    shown = show_ref(folder, "refcoco_unc", ref_id=val["ref_id"])
    assert not any(shown.tiles.values())  # no negatives on val
    assert "no negatives (val split)" in shown.text
    mask = decode_mask(val)
    assert mask.dtype == np.uint8 and mask.shape == tuple(val["mask"]["size"]) and mask.sum() > 0
    assert np.array_equal(decode_mask(val["mask"]), mask)


def test_show_errors(folder, capsys):
    with pytest.raises(ValueError, match="no ref with ref_id 999999"):
        show_ref(folder, "refcoco_unc", ref_id=999999)
    with pytest.raises(ValueError, match="no refs config 'refcocog_umd'"):
        show_ref(folder, "refcocog_umd", ref_id=0)
    with pytest.raises(SystemExit):
        main(["show", str(folder)])  # --ref-id or --sent-id is required
    assert "one of the arguments --ref-id --sent-id is required" in capsys.readouterr().err
    with pytest.raises(TypeError, match="refs row .* or an RLE dict"):
        decode_mask({"counts": "x"})


def test_preview_outlines_the_mask_and_scores_each_negative_tile(folder, source, tmp_path, capsys):
    from datasets import Dataset

    from nemo_hf.transforms.mosaic import NeMoMosaic
    from nemo_hf.inspection.drawing import MASK_ALPHA, MASK_COLOUR, outline_mask
    from nemo_hf.inspection.preview import _tiles

    image = np.full((20, 30, 3), (40, 160, 60), np.uint8)  # "green"
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 8:22] = 1
    drawn = outline_mask(image, mask)
    assert (drawn[5, 8:22] == MASK_COLOUR).all() and (drawn[5:15, 8] == MASK_COLOUR).all()  # the contour
    tint = np.round((1 - MASK_ALPHA) * np.array([40, 160, 60]) + MASK_ALPHA * np.array(MASK_COLOUR))
    assert (drawn[10, 15] == tint).all() and drawn[10, 15, 1] > drawn[10, 15, 0]  # still green inside
    assert (drawn[0, 0] == image[0, 0]).all()

    report = BuildReport.read(folder)
    read = lambda c: Dataset.from_parquet([str(folder / s) for s in report.configs[c]["splits"]["train"]["shards"]])  # noqa: E731
    refs, images = read("refcoco_unc"), read("images")
    row = refs[0]
    sample = NeMoMosaic(images, output_size=64, p={"retrieval": 1.0}, config="refcoco_unc")(
        {k: [v] for k, v in row.items()}
    )
    sample = {k: v[0] for k, v in sample.items()}
    index = [s["sent_id"] for s in row["sentences"]].index(sample["sent_id"])
    scores = dict(zip(row["negatives"][index], row["negative_scores"][index]))
    caption = _tiles(sample, row)
    for quadrant, image_id in enumerate(sample["tile_image_ids"]):
        expected = "target" if quadrant == sample["target_quadrant"] else f"t2i {scores[image_id]:.3f}"
        assert f"{image_id} {expected}" in caption

    assert main(["preview", str(source), "-o", str(tmp_path / "g.png")]) == 2
    assert "is a refer source, not a built folder" in capsys.readouterr().err


def test_push_carries_the_embeddings_and_drops_stale_ones(folder):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from test_hub import RecordingApi

    from nemo_hf.folder.push import push_folder

    api = RecordingApi(existing=["embeddings/refcocog_umd.parquet", "embeddings/refcoco_unc.parquet"])
    push_folder(folder, "someone/nemo-refcoco", token="hf_test", api=api)
    ops = next(c for c in api.calls if c[0] == "create_commit")[2]
    added = {op.path_in_repo: op.path_or_fileobj for op in ops if isinstance(op, CommitOperationAdd)}
    for name in ("embeddings/images.parquet", "embeddings/refcoco_unc.parquet"):
        assert added[name] == str(folder / name)
    assert {op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)} == {"embeddings/refcocog_umd.parquet"}
    assert b"`embeddings/` holds the mining model's" in added["README.md"]  # the card says what they are


def _embeddings_variant(folder, tmp_path, name: str):
    import shutil

    import pyarrow as pa

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    images, sentences = copy / embeddings.IMAGES_FILE, copy / embeddings.sentences_file("refcoco_unc")
    table = pq.read_table(images)
    width = table["embedding"].type.byte_width
    if name == "missing column":
        pq.write_table(table.drop(["embedding"]), images)
    elif name == "variable-width cells":
        pq.write_table(table.set_column(1, "embedding", table["embedding"].cast(pa.binary())), images)
    elif name == "odd width":
        cells = pa.array([c[:width - 1] for c in table["embedding"].to_pylist()], pa.binary(width - 1))
        pq.write_table(table.set_column(1, "embedding", cells), images)
    elif name == "other dimension":
        cells = pa.array([c[:width - 2] for c in table["embedding"].to_pylist()], pa.binary(width - 2))
        pq.write_table(table.set_column(1, "embedding", cells), images)
    elif name == "NaN":
        table = pq.read_table(sentences)
        nan = np.full(width // 2, np.nan, "<f2").tobytes()
        pq.write_table(table.set_column(2, "embedding", pa.array([nan] * len(table), pa.binary(width))), sentences)
    return copy


@pytest.mark.parametrize("name, message", [
    ("missing column", "images.parquet: 'embedding' is no column"),
    ("variable-width cells", "images.parquet: 'embedding' is binary, not float16 vectors"),
    ("odd width", "images.parquet: 'embedding' is fixed_size_binary"),
    ("other dimension", r"images.parquet holds (\d+)-d embeddings, embeddings/refcoco_unc.parquet (?!\1-d)\d+-d"),
    ("NaN", r"refcoco_unc.parquet: row 0 \(sent_id \d+\): an embedding with NaN"),
])
def test_broken_embeddings_are_named_not_a_traceback(folder, tmp_path, capsys, name, message):
    import re

    copy = _embeddings_variant(folder, tmp_path, name)
    ref_id = _train_row(folder)["ref_id"]
    for args in (["stats", str(copy), "-o", str(tmp_path / "s.png")], ["show", str(copy), "--ref-id", str(ref_id)]):
        assert main(args) == 2
        assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("text, message", [
    ("{", "nemo_hf.json: not a nemo_hf build manifest \\(Expecting"),
    ('{"foo": 1}', "nemo_hf.json: not a nemo_hf build manifest \\(.*unexpected keyword argument 'foo'"),
    ("[]", "nemo_hf.json: not a nemo_hf build manifest"),
    ("outside", "refcoco_unc/val shard '../../elsewhere.parquet' is not a file inside the folder"),
    ("absolute", "refcoco_unc/val shard '/.*' is not a file inside the folder"),
])
def test_a_broken_or_hostile_manifest_is_refused(folder, tmp_path, capsys, text, message):
    import re
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "nemo_hf.json").read_text())
    shard = manifest["configs"]["refcoco_unc"]["splits"]["val"]["shards"][0]
    if text in ("outside", "absolute"):
        shutil.copy(copy / shard, tmp_path / "elsewhere.parquet")
        path = "../../elsewhere.parquet" if text == "outside" else str(tmp_path / "elsewhere.parquet")
        manifest["configs"]["refcoco_unc"]["splits"]["val"]["shards"] = [path]
        text = json.dumps(manifest)
    (copy / "nemo_hf.json").write_text(text)
    (tmp_path / "p.jsonl").write_text("")
    for args in (["stats", str(copy), "-o", str(tmp_path / "s.png")], ["show", str(copy), "--ref-id", "0"],
                 ["eval", str(copy), "--split", "val", "--predictions", str(tmp_path / "p.jsonl")]):  # fmt: skip
        assert main(args) == 2, args
        assert re.search(message, capsys.readouterr().err), args


def test_outlines_keep_a_dark_halo_and_the_preview_box_clears_the_mask_outline():
    """Issue 22.8: a yellow outline on a yellow object stays visible (a dark halo on both sides of it), and
    on a rectangular target the preview's box lies outside the mask outline instead of covering it."""
    from nemo_hf.inspection.drawing import HALO_COLOUR, MASK_COLOUR, draw_outline
    from nemo_hf.inspection.preview import BOX_COLOUR, BOX_GAP, _overlay

    yellow = (255, 200, 0)
    image = np.full((20, 20, 3), yellow, np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = draw_outline(image.copy(), mask, yellow)
    assert tuple(out[10, 4]) == HALO_COLOUR and tuple(out[10, 7]) == HALO_COLOUR  # outside, inside the 2-px line
    assert tuple(out[10, 5]) == yellow and tuple(out[10, 6]) == yellow
    sample = {"image": np.full((64, 64, 3), 128, np.uint8), "mask": np.zeros((64, 64), np.uint8),
              "bbox": [16, 16, 32, 32], "target_quadrant": -1, "tile_image_ids": [1]}
    sample["mask"][16:48, 16:48] = 1
    picture = np.asarray(_overlay(sample, 64))
    assert tuple(picture[30, 16]) == MASK_COLOUR and tuple(picture[30, 15]) == HALO_COLOUR
    assert tuple(picture[30, 16 - BOX_GAP]) == BOX_COLOUR
