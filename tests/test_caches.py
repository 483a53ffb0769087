"""Caches keyed by what they were computed from: a rebuilt folder, a moved cache file or chunk, never reused stale."""

import io
import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from nemo_hf import cli
from nemo_hf.folder import build_folder
from nemo_hf.mining.embed import demo_embedder
from nemo_hf.source.synthetic import make_refer_source


def _rebuild_with_box_instances(source, out):
    """The same images and refs, every instance's polygon replaced by its bounding box: other masks."""
    path = source / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        ann["area"] = float(w * h)
    path.write_text(json.dumps(instances))
    return build_folder(source, out, ["refcoco_unc"], mining=None)


def _zeroshot(folder, out, cache):
    argv = ["zeroshot", str(folder), "--split", "val", "--model", "demo-random", "--cache-dir", str(cache), "-o", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 0
    provenance = json.loads(out.with_name(out.name + ".provenance.json").read_text())
    return out.read_bytes(), provenance["images_from_cache"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caches")
    source = make_refer_source(tmp / "src", n_images=24, seed=3, datasets=("refcoco",), image_sizes=((320, 240),))
    before = build_folder(source, tmp / "before", ["refcoco_unc"], mining=None)
    return before, _rebuild_with_box_instances(source, tmp / "after")


def test_zeroshot_cache_of_a_folder_rebuilt_with_other_instances_is_not_reused(folders, tmp_path, capsys):
    """Issue 23 point 1: the feature cache was keyed by model and image id, so a rebuild with changed instances
    scored the old proposal masks. Now each cache file carries the digest of its image's bytes and objects."""
    before, after = folders
    cache = tmp_path / "cache"
    _, from_cache = _zeroshot(before, tmp_path / "before.jsonl", cache)
    assert from_cache == 0
    fresh, _ = _zeroshot(after, tmp_path / "fresh.jsonl", tmp_path / "fresh-cache")
    stale, from_cache = _zeroshot(after, tmp_path / "after.jsonl", cache)
    assert from_cache == 0 and stale == fresh
    again, from_cache = _zeroshot(after, tmp_path / "again.jsonl", cache)  # now the cache holds the rebuilt images
    assert from_cache > 0 and again == fresh


def test_zeroshot_cache_file_moved_to_another_image_of_the_same_size_is_not_reused(folders, tmp_path):
    """Issue 23 point 1: a cache file copied over another image's (same size, so its masks fit) was scored as
    that image's features."""
    from datasets import load_dataset

    _, after = folders
    images = load_dataset(str(after), "images", split="train")
    val = set(load_dataset(str(after), "refcoco_unc", split="val")["image_id"])
    by_size = {}
    for row in images.select_columns(["image_id", "width", "height"]):
        if row["image_id"] in val:
            by_size.setdefault((row["width"], row["height"]), []).append(row["image_id"])
    pair = next((ids[:2] for ids in by_size.values() if len(ids) > 1), None)
    assert pair is not None, by_size
    cache = tmp_path / "cache"
    fresh, _ = _zeroshot(after, tmp_path / "fresh.jsonl", cache)
    (directory,) = [p for p in cache.iterdir() if p.is_dir()]
    shutil.copyfile(directory / f"{pair[0]}.npz", directory / f"{pair[1]}.npz")
    moved, from_cache = _zeroshot(after, tmp_path / "moved.jsonl", cache)
    assert moved == fresh and from_cache == len(val) - 1


def test_zeroshot_cache_file_copied_from_another_cache_is_not_reused(tmp_path):
    """Each feature file carries its cache key (model, proposer, captioner): one copied from another model's
    cache folder is recomputed, not scored."""
    from nemo_hf.zeroshot.encode import FeatureCache, ImageFeatures

    features = ImageFeatures((4, 4), [], np.zeros((0, 2), np.float32), np.zeros((0, 2)), np.ones(2, np.float32))
    one, other = FeatureCache(tmp_path, {"model": "one"}), FeatureCache(tmp_path, {"model": "other"})
    one.put(5, "content", features)
    assert one.get(5, "content") is not None and one.get(5, "another image's content") is None
    shutil.copyfile(one.directory / "5.npz", other.directory / "5.npz")
    assert other.get(5, "content") is None


def _bmp(path, seed):
    """A BMP of fixed dimensions: every such file has the same byte size, whatever its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")


def _demo(seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return demo_embedder(seed, progress=False, num_workers=0)


def test_embedding_cache_file_replaced_with_same_size_and_modification_time_is_recomputed(tmp_path):
    """Issue 23 point 1, the mining embedding cache: a source image replaced by another of the same byte size
    with its modification time put back (``cp -p``, ``rsync -a``) kept the old embedding when the key was
    size and mtime. The change time, which no copy can set back, is in the key now."""
    embedder = _demo()
    path = tmp_path / "7.bmp"
    _bmp(path, 1)
    before = embedder.embed_images([(7, path)], cache_dir=tmp_path / "cache")
    status = os.stat(path)
    time.sleep(0.01)  # a change time the replacement cannot share
    _bmp(tmp_path / "other.bmp", 2)
    os.replace(tmp_path / "other.bmp", path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.stat(path).st_size == status.st_size and os.stat(path).st_mtime_ns == status.st_mtime_ns
    after = embedder.embed_images([(7, path)], cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(after, embedder.embed_images([(7, path.read_bytes())]), atol=1e-6)
    assert not np.allclose(before, after)


@pytest.mark.parametrize("memory_map", [False, True])
def test_embedding_chunk_copied_from_another_models_cache_is_not_used(tmp_path, memory_map):
    """Each chunk carries its cache key's digest: one copied into another model's cache folder is dropped
    with a warning and its embeddings computed by this model."""
    from nemo_hf.mining.cache import EmbeddingCache

    images = [(i, _image_bytes(i)) for i in range(3)]
    one, other = _demo(0), _demo(1)
    expected = other.embed_images(images)
    one.embed_images(images, cache_dir=tmp_path)
    (source,) = [p for p in tmp_path.iterdir() if p.name.startswith("image-")]
    target = EmbeddingCache.for_kind(tmp_path, "image", other.cache_key("image")).directory
    assert target != source
    for chunk in source.glob("chunk-*.npz"):
        shutil.copyfile(chunk, target / chunk.name)
    with pytest.warns(UserWarning, match="another cache key"):
        got = other.embed_images(images, cache_dir=tmp_path, memory_map=memory_map)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _image_bytes(seed) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_feature_cache_key_follows_sam_and_captioner_weights_not_their_names(tmp_path):
    """Sibling of point 1: SAM and the captioner were keyed by name only, so a checkpoint rewritten at the same
    path (or retrained) reused the old proposals and captions. Their weights' identity is in the key now;
    from a local directory it is the hash of its weight files, as for the embedder."""
    from zeroshot_models import tiny_captioner, tiny_sam

    from nemo_hf.zeroshot.captioner import Captioner
    from nemo_hf.zeroshot.encode import ClipEncoder
    from nemo_hf.zeroshot.predict import TasPredictor
    from nemo_hf.zeroshot.proposals import SamProposals

    encoder = ClipEncoder(_demo())
    sam = [SamProposals(*tiny_sam(seed), "same/path") for seed in (0, 1)]
    captioner = [Captioner(*tiny_captioner(seed), "same/path") for seed in (0, 1)]
    keys = [TasPredictor(encoder, sam[a], None, captioner[b]).cache_key() for a, b in ((0, 0), (1, 0), (0, 1))]
    assert keys[0] != keys[1] and keys[0] != keys[2]
    assert TasPredictor(encoder, SamProposals(*tiny_sam(0), "same/path"), None, captioner[0]).cache_key() == keys[0]

    model, processor = tiny_sam(0)
    model.save_pretrained(tmp_path / "sam")
    processor.save_pretrained(tmp_path / "sam")
    before = SamProposals.from_pretrained(str(tmp_path / "sam")).cache_key()
    tiny_sam(1)[0].save_pretrained(tmp_path / "sam")  # retrained, saved at the same path
    assert SamProposals.from_pretrained(str(tmp_path / "sam")).cache_key() != before


def test_load_dataset_images_config_is_rebuilt_when_an_image_file_is_replaced(tiny_source, tmp_path):
    """`load_dataset("nemo_refcoco", "images", source=...)` keyed its `datasets` cache entry on the annotation
    files only, so an image replaced in the source folder was served from the cache with its old bytes."""
    from datasets import load_dataset

    kw = dict(source=str(tiny_source), cache_dir=str(tmp_path / "cache"), split="train")
    before = load_dataset("nemo_refcoco", "images", **kw)
    path = tiny_source / "images/mscoco/images/train2014/COCO_train2014_000000000012.jpg"
    old = path.read_bytes()
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:, :, 2] = 200
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    assert path.read_bytes() != old
    after = load_dataset("nemo_refcoco", "images", **kw)
    row = after[after["image_id"].index(12)]
    assert row["image"].getpixel((5, 5))[2] > 150
    assert before[before["image_id"].index(12)]["image"].getpixel((5, 5))[2] < 100
