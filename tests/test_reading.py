"""Reading a built folder (issues 22.3 and 23.2, 23.3, 23.4, 23.7): in place (no `datasets` cache copy), only
the files the manifest names inside the folder, only regular files, bounded per row, cross-checked.

Cases that hung before (a FIFO where a file is expected) run in a subprocess with a timeout, so a hang fails
the test instead of pytest.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_tiny_source
from nemo_hf.cli import main
from nemo_hf.evaluation.predictions import PredictionsFormatError, read_predictions, write_predictions
from nemo_hf.evaluation.scoring import split_tables
from nemo_hf.folder import build_folder
from nemo_hf.folder.build import MiningOptions
from nemo_hf.folder.files import NotRegularFile, open_regular, regular_file
from nemo_hf.folder.reading import read_split
from nemo_hf.source.synthetic import make_refer_source
from nemo_hf.transforms.images import ImageTable
from nemo_hf.zeroshot.run import decode_full

TIMEOUT = 120


def run_cli(args: list[str], tmp_path: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``nemo-hf ARGS`` in a fresh interpreter; a hang fails the calling test, not pytest."""
    code = f"import sys; from nemo_hf.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "subprocess_cache")}
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nemo-hf {args[0]} hung for more than {timeout} s")


def run_python(code: str, tmp_path: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for more than {timeout} s")


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """A mined synthetic folder (demo embedder): every inspection command has something to show."""
    tmp = tmp_path_factory.mktemp("reading")
    source = make_refer_source(tmp / "src", n_images=14, seed=5, datasets=("refcoco",))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DEMO EMBEDDER")
        options = MiningOptions(model="demo-random", top_k=3, embed_cache_dir=str(tmp / "emb"))
        return build_folder(source, tmp / "out", ["refcoco_unc"], mining=options)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return build_folder(write_tiny_source(tmp / "src"), tmp / "out", ["refcoco_unc"], mining=None)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy", symlinks=True))


def shard(folder: Path, config: str, split: str) -> Path:
    manifest = json.loads((folder / "nemo_hf.json").read_text())
    return folder / manifest["configs"][config]["splits"][split]["shards"][0]


def rewrite(path: Path, change) -> None:
    """The shard rewritten with ``change(table) -> table``, under the same name."""
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def val_predictions(folder: Path, path: Path) -> Path:
    """Perfect predictions for the val split (the ground truth itself)."""
    refs = pq.read_table(shard(folder, "refcoco_unc", "val")).to_pylist()
    return write_predictions(path, {s["sent_id"]: r["mask"] for r in refs for s in r["sentences"]})


# ---------------------------------------------------------------- 22.3: in place, not through the datasets cache


def _cache_bytes() -> int:
    cache = Path(os.environ["HF_DATASETS_CACHE"])  # conftest: a fresh one per test
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def test_preview_stats_and_show_leave_the_datasets_cache_empty(mined, tmp_path, capsys):
    folder_size = sum(p.stat().st_size for p in mined.rglob("*.parquet"))
    assert main(["preview", str(mined), "-n", "4", "--size", "96", "-o", str(tmp_path / "grid.png")]) == 0
    assert main(["stats", str(mined), "-o", str(tmp_path / "stats.png")]) == 0
    ref_id = pq.read_table(shard(mined, "refcoco_unc", "train"), columns=["ref_id"])["ref_id"][0].as_py()
    assert main(["show", str(mined), "--ref-id", str(ref_id), "-o", str(tmp_path / "show.png")]) == 0
    assert all((tmp_path / name).stat().st_size > 0 for name in ("grid.png", "stats.png", "show.png"))
    assert folder_size > 50_000
    assert _cache_bytes() < 1_000, sorted(Path(os.environ["HF_DATASETS_CACHE"]).rglob("*"))
    # what load_dataset would have cost (the check can fail): a copy of the folder in the cache
    from datasets import load_dataset

    load_dataset(str(mined), "images", split="train")
    assert _cache_bytes() > folder_size / 2


def test_read_split_is_the_folder_s_rows(mined):
    refs = read_split(mined, "refcoco_unc", "val")
    assert refs.to_list() == pq.read_table(shard(mined, "refcoco_unc", "val")).to_pylist()
    images = read_split(mined, "images")
    assert isinstance(images[0]["image"], Image.Image)  # the schema's features: the Image column decodes
    assert len(ImageTable(images, config="refcoco_unc").pool()) > 0
    wanted = sorted(set(refs["image_id"]))  # zeroshot reads only its split's images
    only = read_split(mined, "images", image_ids=wanted)
    all_ids = list(images["image_id"])
    assert list(only["image_id"]) == wanted and len(wanted) < len(all_ids)
    assert only[0]["image"].tobytes() == images[all_ids.index(wanted[0])]["image"].tobytes()


# ---------------------------------------------------------------- 23.2: only regular files are opened


@pytest.mark.parametrize("command", ["eval", "preview", "stats", "show"])
def test_a_fifo_for_a_shard_is_named_and_nothing_hangs(tiny, tmp_path, command):
    folder = copy_of(tiny, tmp_path)
    split = "val" if command == "eval" else "train"
    target = shard(folder, "refcoco_unc", split)
    target.unlink()
    os.mkfifo(target)
    preds = val_predictions(tiny, tmp_path / "p.jsonl")
    extra = {"eval": ["--predictions", str(preds)], "preview": ["-o", "g.png"], "stats": ["-o", "s.png"],
             "show": ["--ref-id", "0"]}[command]
    done = run_cli([command, str(folder), *extra], tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"{target}: refcoco_unc shard is a FIFO (named pipe), not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind, message", [
    ("fifo", "is a FIFO (named pipe)"),
    ("dev_zero", "is a character device"),
    ("directory", "is a directory"),
])
def test_special_predictions_files_are_named(tiny, tmp_path, kind, message):
    path = tmp_path / "preds.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    done = run_cli(["eval", str(tiny), "--predictions", str(path)], tmp_path)
    assert done.returncode == 2
    assert f"{path}: predictions file {message}, not a regular file" in done.stderr
    parquet = tmp_path / "preds.parquet"
    parquet.symlink_to("/dev/zero")
    done = run_cli(["eval", str(tiny), "--predictions", str(parquet)], tmp_path)
    assert done.returncode == 2 and "predictions file is a character device" in done.stderr


def test_open_regular_never_blocks_and_names_what_it_found(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"ok")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    done = run_python(f"""
        from nemo_hf.folder.files import open_regular
        try:
            open_regular({str(tmp_path / 'fifo')!r}, "cache file")
        except ValueError as err:
            print(err)
    """, tmp_path, timeout=60)
    assert done.stdout.strip().endswith("fifo: cache file is a FIFO (named pipe), not a regular file"), done.stderr
    with open_regular(tmp_path / "link", "x") as f:
        assert f.read() == b"ok"
    with pytest.raises(NotRegularFile, match="is a symbolic link to"):
        open_regular(tmp_path / "link", "x", follow_symlinks=False)
    with pytest.raises(NotRegularFile, match="x is a symbolic link"):
        regular_file(tmp_path / "link", "x", follow_symlinks=False)
    with pytest.raises(FileNotFoundError, match="absent: x not found"):
        regular_file(tmp_path / "absent", "x")


def test_special_cache_files_are_skipped_not_read(tmp_path):
    """The zero-shot feature cache and the embedding cache: a FIFO or /dev/zero in place of a cache file is
    ignored (and recomputed), never opened; nemo_hf did not write it, so it is not removed either."""
    done = run_python(f"""
        import os, warnings
        from pathlib import Path
        import numpy as np
        from nemo_hf.mining.cache import EmbeddingCache
        from nemo_hf.zeroshot.encode import FeatureCache
        warnings.simplefilter("always")
        cache = FeatureCache({str(tmp_path / 'fc')!r}, {{"model": "m"}})
        os.mkfifo(cache.directory / "7.npz")
        os.symlink("/dev/zero", cache.directory / "8.npz")
        with warnings.catch_warnings(record=True) as caught:
            print(cache.get(7, "digest"), cache.get(8, "digest"))
        print(sorted(str(w.message).split(": ", 1)[1] for w in caught))
        emb = EmbeddingCache({str(tmp_path / 'ec')!r}, {{"model": "m"}})
        emb.append(["1:a"], np.ones((1, 4), np.float32))
        os.mkfifo(emb.directory / "chunk-0.npz")
        os.symlink("/dev/zero", emb.directory / "chunk-1.npz")
        with warnings.catch_warnings(record=True) as caught:
            print(sorted(emb.keys()))
        print(len(caught), sorted(p.name for p in emb.directory.glob("chunk-[01].npz")))
    """, tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "None None"
    assert "7.npz is not a regular file; ignored, its features are recomputed" in lines[1]
    assert lines[2] == "['1:a']"
    assert lines[3] == "2 ['chunk-0.npz', 'chunk-1.npz']"


def test_a_manifest_that_is_not_a_regular_file_is_named(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    (folder / "nemo_hf.json").unlink()
    os.mkfifo(folder / "nemo_hf.json")
    done = run_cli(["stats", str(folder)], tmp_path)
    assert done.returncode == 2
    assert "nemo_hf.json: build manifest is a FIFO (named pipe), not a regular file" in done.stderr


# ---------------------------------------------------------------- 23.3: only files inside the folder


@pytest.mark.parametrize("command", ["eval", "preview", "stats", "show", "zeroshot"])
def test_a_symlinked_shard_is_refused(tiny, tmp_path, command):
    folder = copy_of(tiny, tmp_path)
    split = "val" if command in ("eval", "zeroshot") else "train"
    target = shard(folder, "refcoco_unc", split)
    outside = tmp_path / "elsewhere.parquet"
    shutil.move(target, outside)
    target.symlink_to(outside)
    preds = val_predictions(tiny, tmp_path / "p.jsonl")
    extra = {"eval": ["--predictions", str(preds)], "preview": ["-o", "g.png"], "stats": ["-o", "s.png"],
             "show": ["--ref-id", "0"], "zeroshot": ["--model", "demo-random", "-o", "z.jsonl"]}[command]
    done = run_cli([command, str(folder), *extra], tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"{target}: refcoco_unc shard is a symbolic link to {str(outside)!r}" in done.stderr


@pytest.mark.parametrize("kind, message", [("symlink", "is a symbolic link to"), ("fifo", "is a FIFO (named pipe)")])
def test_kept_embeddings_are_read_only_as_regular_files_inside_the_folder(mined, tmp_path, kind, message):
    folder = copy_of(mined, tmp_path)
    target = folder / "embeddings/images.parquet"
    if kind == "symlink":
        shutil.move(target, tmp_path / "elsewhere.parquet")
        target.symlink_to(tmp_path / "elsewhere.parquet")
    else:
        target.unlink()
        os.mkfifo(target)
    done = run_cli(["stats", str(folder), "-o", "s.png"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{target}: mining embeddings {message}" in done.stderr


def test_the_card_s_paths_never_make_a_reader_read_another_folder(tiny, mined, tmp_path):
    """The card's ``configs:`` paths pointed at another build (absolute, and ``../``): the readers still
    read this folder's shards, those its manifest names."""
    folder = copy_of(tiny, tmp_path)
    card = (folder / "README.md").read_text()
    other = sorted((mined / "data/refcoco_unc").glob("train-*.parquet"))[0]
    own = shard(folder, "refcoco_unc", "train").relative_to(folder).as_posix()
    for replacement in (str(other), os.path.relpath(other, folder)):
        (folder / "README.md").write_text(card.replace(own, replacement))
        rows = read_split(folder, "refcoco_unc", "train")
        assert list(rows["ref_id"]) == pq.read_table(folder / own)["ref_id"].to_pylist()
        assert list(rows["ref_id"]) != pq.read_table(other)["ref_id"].to_pylist()
    assert main(["preview", str(folder), "-n", "2", "--size", "64", "-o", str(tmp_path / "g.png")]) == 0


def test_an_image_row_with_a_path_and_no_bytes_is_refused_and_the_path_never_opened(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (64, 48), "red").save(secret)
    images = shard(folder, "images", "train")

    def drop_bytes(table):
        cells = table["image"].to_pylist()
        cells[0] = {"bytes": None, "path": str(secret)}
        return table.set_column(table.column_names.index("image"), "image", pa.array(cells, table.schema.field("image").type))

    rewrite(images, drop_bytes)
    image_id = pq.read_table(images, columns=["image_id"])["image_id"][0].as_py()
    with pytest.raises(ValueError, match=f"image {image_id} has no bytes but a path \\({str(secret)!r}\\), which is never read"):
        read_split(folder, "images")
    from datasets import Dataset

    table = ImageTable(Dataset(pq.read_table(images)))  # a Dataset made some other way: the same refusal
    with pytest.raises(ValueError, match=f"image {image_id}: its row has no bytes but a path"):
        table.bytes_of(image_id)
    done = run_cli(["preview", str(folder), "-o", "g.png"], tmp_path)
    assert done.returncode == 2 and "which is never read" in done.stderr


# ---------------------------------------------------------------- 23.4: what one row may cost is bounded


def test_a_one_line_predictions_file_of_many_values_is_refused_before_parsing(tiny, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"sent_id": 1, "mask": {"size": [48, 64], "counts": [' + "{}," * 3_000_000 + "{}]}}\n")
    assert path.stat().st_size > 8_000_000
    with pytest.raises(PredictionsFormatError, match=r"big.jsonl:1: more than 256 JSON values on one line"):
        list(read_predictions(path))
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(PredictionsFormatError, match=r"deep.jsonl:1: JSON nested too deeply"):
        list(read_predictions(deep))
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"sent_id": ' + str(2**70) + ', "mask": {"size": [48, 64], "counts": "0"}}\n')
    with pytest.raises(PredictionsFormatError, match=r"huge.jsonl:1: sent_id 1180591620717411303424 does not fit in 64 bits"):
        list(read_predictions(huge))


def test_a_counts_cell_longer_than_its_mask_can_need_is_refused_before_decoding(tiny, tmp_path):
    refs = pq.read_table(shard(tiny, "refcoco_unc", "val")).to_pylist()
    sent_id = refs[0]["sentences"][0]["sent_id"]
    path = tmp_path / "p.parquet"
    write_predictions(path, {sent_id: {"size": [48, 64], "counts": "1" * 20_000_000}})
    done = run_cli(["eval", str(tiny), "--predictions", str(path)], tmp_path)
    assert done.returncode == 2
    assert f"sent_id {sent_id} ({path}: row 0): counts holds 20000000 characters, more than a 48x64 mask can need" in done.stderr


def _jpeg_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_header_declaring_huge_sides_is_refused_before_decoding():
    table = ImageTable({5: _jpeg_declaring(65000, 65000), 6: _png_declaring(65000, 65000)})
    with pytest.raises(ValueError, match=r"^image 5 cannot be decoded: its header declares 65000x65000 px: sides are "
                       r"limited to 32768 px$"):
        decode_full(table, 5)
    with pytest.raises(ValueError, match=r"^image 6 cannot be decoded: Image size \(4225000000 pixels\) exceeds limit"):
        decode_full(table, 6)


def test_folder_images_read_a_row_group_at_a_time_and_render_as_the_dataset_does(tiny, tmp_path):
    """preview / difficulty read images through `FolderImages`: the same mosaics as from the images Dataset
    (pool included), with only the row groups drawn from held in memory."""
    import numpy as np

    from nemo_hf.folder.reading import FolderImages
    from nemo_hf.transforms.mosaic import NeMoMosaic

    folder = copy_of(tiny, tmp_path)
    path = shard(folder, "images", "train")
    pq.write_table(pq.read_table(path), path, row_group_size=1)  # one row group per image
    images = FolderImages(folder)
    dataset = read_split(folder, "images")
    assert sorted(images) == sorted(dataset["image_id"]) and len(images) == len(dataset)
    pool = images.pool("refcoco_unc")
    assert pool == NeMoMosaic(dataset, config="refcoco_unc").images.pool()
    refs = read_split(folder, "refcoco_unc", "train")[:4]
    for mode in ("random", "single"):
        a = NeMoMosaic(dataset, output_size=48, p={mode: 1.0}, config="refcoco_unc", return_arrays=True)(refs)
        b = NeMoMosaic(images, output_size=48, p={mode: 1.0}, pool=pool, return_arrays=True)(refs)
        assert a["tile_image_ids"] == b["tile_image_ids"]
        assert all(np.array_equal(x, y) for x, y in zip(a["image"], b["image"]))
    assert 0 < len(images._groups) <= FolderImages.CACHED_GROUPS
    fresh = FolderImages(folder)
    fresh[pool[0]]
    assert len(fresh._groups) == 1  # one image read: one row group held


def test_a_mosaic_never_decodes_an_image_whose_header_declares_huge_sides():
    """A negative declaring 65000 px sides is replaced with a note, a target stops naming its ref: neither is
    decoded (at 1/8 scale, 8125 px a side would still cost about 200 MB)."""
    import numpy as np

    from nemo_hf.masks import encode_rle
    from nemo_hf.transforms.mosaic import NeMoMosaic

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "JPEG")
    images = {1: buffer.getvalue(), 2: _jpeg_declaring(65000, 65000), 3: buffer.getvalue()}
    mask = np.zeros((48, 64), np.uint8)
    mask[:8, :8] = 1
    row = {"ref_id": 7, "image_id": 1, "split": "train", "sentences": [{"sent_id": 70, "sent": "the thing"}],
           "negatives": [[2]], "mask": encode_rle(mask)}
    mosaic = NeMoMosaic(images, output_size=32, p={"retrieval": 1.0}, pool=[3], return_arrays=True)
    out = mosaic.render(row)
    assert 2 not in out["tile_image_ids"] and any("negative 2 unreadable (ValueError)" in n for n in out["notes"])
    with pytest.raises(ValueError, match=r"ref 8: target image 2 cannot be read: its header declares 65000x65000 px"):
        mosaic.render({**row, "ref_id": 8, "image_id": 2})


def test_show_names_an_image_too_large_to_draw(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    images = shard(folder, "images", "train")

    def bomb(table):
        cells = [{"bytes": _png_declaring(65000, 65000), "path": None}] * len(table)
        return table.set_column(table.column_names.index("image"), "image", pa.array(cells, table.schema.field("image").type))

    rewrite(images, bomb)
    done = run_cli(["show", str(folder), "--ref-id", "0", "-o", "s.png"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "image 11 cannot be shown: Image size (4225000000 pixels) exceeds limit" in done.stderr


# ---------------------------------------------------------------- 23.7: a damaged refs shard is not scored


@pytest.mark.parametrize("first, second, message", [
    ("ref_id", "ann_id", "ref 112: ann_id 1 is not an instance of image 12"),
    ("image_id", "category_id", "ref 1: image_id 47 is not in the images config"),
    ("category", "split", "ref 1 says split 'cup' in the val shard"),
])
def test_swapped_columns_in_a_refs_shard_stop_eval(tiny, tmp_path, first, second, message):
    folder = copy_of(tiny, tmp_path)
    preds = val_predictions(tiny, tmp_path / "p.jsonl")
    assert main(["eval", str(folder), "--predictions", str(preds)]) == 0
    target = shard(folder, "refcoco_unc", "val")

    def swap(table):
        a, b = table.column_names.index(first), table.column_names.index(second)
        return table.set_column(a, first, table[second]).set_column(b, second, table[first])

    rewrite(target, swap)
    done = run_cli(["eval", str(folder), "--predictions", str(preds)], tmp_path)
    assert done.returncode == 2, done.stdout
    assert f"{folder} (refcoco_unc/val): {message}" in done.stderr
    done = run_cli(["zeroshot", str(folder), "--model", "demo-random", "-o", "z.jsonl"], tmp_path)
    assert done.returncode == 2 and message in done.stderr


def test_a_column_of_another_type_or_a_damaged_mask_is_named(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    target = shard(folder, "refcoco_unc", "val")
    original = pq.read_table(target)
    rewrite(target, lambda t: t.set_column(t.column_names.index("ann_id"), "ann_id", t["ann_id"].cast(pa.float64())))
    with pytest.raises(ValueError, match=f"{target}: column ann_id is double, not int64"):
        split_tables(folder, "refcoco_unc", "val")

    def damaged(table):
        masks = table["mask"].to_pylist()
        masks[0] = {"size": masks[0]["size"], "counts": "0" * 10}
        return table.set_column(table.column_names.index("mask"), "mask", pa.array(masks, table.schema.field("mask").type))

    pq.write_table(damaged(original), target)
    preds = val_predictions(tiny, tmp_path / "p.jsonl")
    done = run_cli(["eval", str(folder), "--predictions", str(preds)], tmp_path)
    assert done.returncode == 2
    assert "ann 112: the ground-truth mask is unreadable (counts cover 0 pixels, not h*w = 3072)" in done.stderr


def test_a_truncated_shard_is_named(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    target = shard(folder, "refcoco_unc", "train")
    target.write_bytes(target.read_bytes()[:100])
    done = run_cli(["stats", str(folder), "-o", "s.png"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{target}: not a readable Parquet shard" in done.stderr


def test_an_eval_of_a_sound_folder_still_scores(tiny, tmp_path):
    preds = val_predictions(tiny, tmp_path / "p.jsonl")
    assert main(["eval", str(tiny), "--predictions", str(preds), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["oIoU"] == pytest.approx(1.0)
