"""Embeddings with a tiny randomly initialised CLIP: shapes, invariances, the on-disk cache, errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nemo_hf.mining.cache import EmbeddingCache
from nemo_hf.mining.embed import Embedder, ModelLoadError, demo_embedder
from nemo_hf.mining.identity import checkpoint_identity

SHARED_CLIP = Path("/work/shared/models/clip-vit-base-patch32-notweights")
needs_clip_files = pytest.mark.skipif(
    not (SHARED_CLIP / "tokenizer.json").exists(),
    reason=f"the CLIP tokenizer and image processor files are expected in {SHARED_CLIP}",
)


def tiny_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel

    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**layer, "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": 49407},
        vision_config={**layer, "image_size": 224, "patch_size": 32},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def make_embedder(seed: int = 0, **kwargs) -> Embedder:
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    kwargs = {"progress": False, "num_workers": 0, "batch_size": 2, **kwargs}
    image_processor = CLIPImageProcessorPil.from_pretrained(SHARED_CLIP)
    return Embedder(tiny_clip(seed), image_processor, AutoTokenizer.from_pretrained(SHARED_CLIP), **kwargs)


class ForwardCounter:
    """Counts real forward passes of a submodule (a hook, the model itself runs)."""

    def __init__(self, module: torch.nn.Module, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after
        module.register_forward_hook(self._hook)

    def _hook(self, *_):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1


def jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    colour = rng.uniform(0, 255, 3)
    pixels = np.clip(colour + 70 * np.sin(x / (4 + seed) + y / 7)[..., None], 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


IMAGES = [(i, jpeg(i)) for i in range(7)]
SENTENCES = ["man on the left", "red car", "the dog", "a woman holding an umbrella", "x"]
TEXTS = [(100 + i, text) for i, text in enumerate(SENTENCES)]


@needs_clip_files
def test_shapes_normalisation_and_sources(tmp_path):
    embedder = make_embedder()
    (tmp_path / "3.jpg").write_bytes(IMAGES[3][1])
    images = [(i, tmp_path / "3.jpg" if i == 3 else data) for i, data in IMAGES]
    emb = embedder.embed_images(images)
    assert emb.shape == (7, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(emb[3], embedder.embed_images([IMAGES[3]])[0], atol=1e-6)  # path == bytes
    text = embedder.embed_texts(TEXTS)
    assert text.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-6)
    assert embedder.embed_texts([]).shape == (0, 16)


@needs_clip_files
def test_batch_size_and_order_invariance():
    one, five = make_embedder(batch_size=1), make_embedder(batch_size=5)
    np.testing.assert_allclose(one.embed_images(IMAGES), five.embed_images(IMAGES), atol=1e-5)
    np.testing.assert_allclose(one.embed_texts(TEXTS), five.embed_texts(TEXTS), atol=1e-5)
    shuffled = TEXTS[::-1]
    np.testing.assert_allclose(five.embed_texts(shuffled), five.embed_texts(TEXTS)[::-1], atol=1e-5)


@needs_clip_files
def test_decode_workers_give_the_same_embeddings():
    inline = make_embedder(num_workers=0).embed_images(IMAGES)
    np.testing.assert_allclose(make_embedder(num_workers=1).embed_images(IMAGES), inline, atol=1e-6)


@needs_clip_files
def test_cache_hit_computes_nothing(tmp_path):
    embedder = make_embedder()
    vision, text = ForwardCounter(embedder.model.vision_model), ForwardCounter(embedder.model.text_model)
    first = embedder.embed_images(IMAGES, cache_dir=tmp_path), embedder.embed_texts(TEXTS, cache_dir=tmp_path)
    assert (vision.calls, text.calls) == (4, 3)
    second = embedder.embed_images(IMAGES, cache_dir=tmp_path), embedder.embed_texts(TEXTS, cache_dir=tmp_path)
    assert (vision.calls, text.calls) == (4, 3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # a subset and a new image: only the new one is computed
    embedder.embed_images(IMAGES[:2] + [(99, jpeg(99))], cache_dir=tmp_path)
    assert vision.calls == 5


@needs_clip_files
def test_changed_sentence_is_not_served_stale(tmp_path):
    embedder = make_embedder()
    counter = ForwardCounter(embedder.model.text_model)
    before = embedder.embed_texts([(1, "the red car")], cache_dir=tmp_path)
    after = embedder.embed_texts([(1, "the blue bus")], cache_dir=tmp_path)
    assert counter.calls == 2 and not np.allclose(before, after)


@needs_clip_files
def test_changed_image_is_not_served_stale(tmp_path):
    """Image ids are not content: another source (or a replaced file) may use an id for another image."""
    embedder = make_embedder()
    counter = ForwardCounter(embedder.model.vision_model)
    cache = tmp_path / "cache"
    before = embedder.embed_images([(7, jpeg(1))], cache_dir=cache)
    after = embedder.embed_images([(7, jpeg(2))], cache_dir=cache)
    assert counter.calls == 2 and not np.allclose(before, after)
    np.testing.assert_allclose(after, embedder.embed_images([(7, jpeg(2))]), atol=1e-6)
    path = tmp_path / "7.jpg"
    path.write_bytes(jpeg(3))
    from_file = embedder.embed_images([(7, path)], cache_dir=cache)
    assert counter.calls == 4 and not np.allclose(from_file, after)
    embedder.embed_images([(7, path)], cache_dir=cache)
    assert counter.calls == 4  # an unchanged file is a cache hit
    path.write_bytes(jpeg(4, size=(60, 40)))
    replaced = embedder.embed_images([(7, path)], cache_dir=cache)
    np.testing.assert_allclose(replaced, embedder.embed_images([(7, jpeg(4, size=(60, 40)))]), atol=1e-6)


@needs_clip_files
def test_resume_after_interruption(tmp_path):
    reference = make_embedder().embed_images(IMAGES)
    embedder = make_embedder(cache_chunk=2)
    counter = ForwardCounter(embedder.model.vision_model, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        embedder.embed_images(IMAGES, cache_dir=tmp_path)
    assert counter.calls == 2  # two batches of two done, then the run stopped
    counter.fail_after = None
    resumed = embedder.embed_images(IMAGES, cache_dir=tmp_path)
    assert counter.calls == 4  # only the three images left, in two batches
    np.testing.assert_allclose(resumed, reference, atol=1e-6)


@needs_clip_files
@pytest.mark.parametrize("memory_map", [False, True])
def test_unreadable_chunk_is_recomputed(tmp_path, memory_map):
    embedder = make_embedder(cache_chunk=3)
    reference = embedder.embed_images(IMAGES, cache_dir=tmp_path)
    chunk = sorted(tmp_path.rglob("chunk-*.npz"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # a write cut short
    counter = ForwardCounter(embedder.model.vision_model)
    with pytest.warns(UserWarning, match="unreadable chunk"):
        again = embedder.embed_images(IMAGES, cache_dir=tmp_path, memory_map=memory_map)
    assert counter.calls >= 1 and not chunk.exists()
    np.testing.assert_allclose(again, reference, atol=1e-6)
    if memory_map:  # the matrix holds what the cache now holds
        np.testing.assert_array_equal(again, embedder.embed_images(IMAGES, cache_dir=tmp_path))


def matrices(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("matrix-*.npy"))


def _key(image) -> str:
    from nemo_hf.mining.cache import image_key as _image_key

    return _image_key(*image)


@needs_clip_files
def test_memory_map_equals_the_array_in_ram(tmp_path):
    embedder = make_embedder(cache_chunk=3)
    counter = ForwardCounter(embedder.model.vision_model)
    (tmp_path / "5.jpg").write_bytes(IMAGES[5][1])
    images = [(i, tmp_path / "5.jpg" if i == 5 else data) for i, data in IMAGES] + [IMAGES[2], IMAGES[0], IMAGES[2]]
    embedder.embed_images(images[:3], cache_dir=tmp_path)  # the cache holds 3 of the 7 distinct images
    assert counter.calls == 2
    mapped = embedder.embed_images(images, cache_dir=tmp_path, memory_map=True)
    assert counter.calls == 4  # the 4 others, in two batches of two
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32 and mapped.shape == (10, 16)
    assert matrices(tmp_path) == [Path(mapped.filename)] and Path(mapped.filename).parent.name.startswith("image-")
    np.testing.assert_array_equal(mapped, embedder.embed_images(images, cache_dir=tmp_path))
    np.testing.assert_array_equal(mapped[[7, 8, 9]], mapped[[2, 0, 2]])
    assert counter.calls == 4
    assert not mapped.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        mapped[0, 0] = 0
    with pytest.raises(ValueError, match="cache_dir"):
        embedder.embed_images(images, memory_map=True)


@needs_clip_files
def test_memory_map_takes_a_key_from_its_first_chunk_as_the_array_in_ram_does(tmp_path):
    embedder = make_embedder()
    embedder.embed_images(IMAGES[:3], cache_dir=tmp_path)
    [folder] = tmp_path.glob("image-*")
    stamp = EmbeddingCache(folder, embedder.cache_key("image")).key  # what each chunk says it was computed under
    rng = np.random.default_rng(0)
    for name in ("chunk-0.npz", "chunk-z.npz"):  # before and after every uuid-named chunk
        np.savez(folder / name, key=np.asarray(stamp), keys=np.array([_key(IMAGES[1])]),
                 vectors=rng.normal(size=(1, 16)).astype(np.float32))
    mapped = embedder.embed_images(IMAGES[:3], cache_dir=tmp_path, memory_map=True)
    np.testing.assert_array_equal(mapped[1], np.load(folder / "chunk-0.npz")["vectors"][0])
    np.testing.assert_array_equal(mapped, embedder.embed_images(IMAGES[:3], cache_dir=tmp_path))


@needs_clip_files
def test_memory_map_reuses_its_file_and_replaces_it_for_other_images(tmp_path):
    embedder = make_embedder()
    first = embedder.embed_images(IMAGES, cache_dir=tmp_path, memory_map=True)
    reference = np.array(first)
    [path] = matrices(tmp_path)
    before = path.stat()
    counter = ForwardCounter(embedder.model.vision_model)
    again = embedder.embed_images(IMAGES, cache_dir=tmp_path, memory_map=True)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns) and counter.calls == 0
    np.testing.assert_array_equal(again, reference)

    subset = embedder.embed_images(IMAGES[:5], cache_dir=tmp_path, memory_map=True)
    [other] = matrices(tmp_path)
    assert other != path and counter.calls == 0
    np.testing.assert_array_equal(subset, reference[:5])
    reordered = embedder.embed_images(IMAGES[::-1], cache_dir=tmp_path, memory_map=True)
    np.testing.assert_array_equal(reordered, reference[::-1])
    assert len(matrices(tmp_path)) == 1

    [path] = matrices(tmp_path)
    damage = [
        lambda: path.write_bytes(path.read_bytes()[:200]),  # cut short
        lambda: np.save(path, np.zeros((7, 8), np.float32)),  # another shape
        lambda: (path.unlink(), os.mkfifo(path)),  # reading it would block
    ]
    for damaged in damage:  # rewritten, not served
        damaged()
        rebuilt = embedder.embed_images(IMAGES[::-1], cache_dir=tmp_path, memory_map=True)
        np.testing.assert_array_equal(rebuilt, reference[::-1])
        assert matrices(tmp_path) == [path] and path.is_file()
    assert counter.calls == 0
    assert not list(tmp_path.rglob("*.tmp"))


@needs_clip_files
def test_memory_map_refuses_to_leave_a_row_unfilled(tmp_path, monkeypatch):
    """A chunk that vanishes between listing the cache and filling the matrix: an error, not a row of zeros."""

    embedder = make_embedder()
    embedder.embed_images(IMAGES[:3], cache_dir=tmp_path)
    listed = EmbeddingCache.keys
    monkeypatch.setattr(EmbeddingCache, "keys", lambda self: listed(self) | {_key(IMAGES[4])})
    with pytest.raises(RuntimeError, match="image 4: its embedding left the cache"):
        embedder.embed_images(IMAGES[:5], cache_dir=tmp_path, memory_map=True)
    assert not matrices(tmp_path) and not list(tmp_path.rglob("*.tmp"))


@needs_clip_files
def test_cache_key_follows_the_weights(tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPProcessor, AutoTokenizer

    first, other = make_embedder(seed=0), make_embedder(seed=1)
    assert first.cache_key("image") != other.cache_key("image")
    first.embed_images(IMAGES, cache_dir=tmp_path)
    counter = ForwardCounter(other.model.vision_model)
    other.embed_images(IMAGES, cache_dir=tmp_path)
    assert counter.calls == 4  # nothing served from the first model's cache

    image_processor = CLIPImageProcessorPil.from_pretrained(SHARED_CLIP)
    processor = CLIPProcessor(image_processor, AutoTokenizer.from_pretrained(SHARED_CLIP))
    checkpoint = tmp_path / "clip"
    tiny_clip(0).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    loaded = Embedder.from_pretrained(checkpoint, progress=False, num_workers=0)
    assert loaded.identity.model_id == str(checkpoint.resolve()) and loaded.identity.checkpoint_sha256
    np.testing.assert_allclose(loaded.embed_texts(TEXTS), first.embed_texts(TEXTS), atol=1e-6)
    tiny_clip(1).save_pretrained(checkpoint)
    assert checkpoint_identity(checkpoint).checkpoint_sha256 != loaded.identity.checkpoint_sha256


def test_unloadable_model_says_what_to_do():
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as err:
        Embedder.from_pretrained("/no/such/checkpoint")
    assert "--model /path/to/clip" in str(err.value)


@needs_clip_files
def test_bad_image_is_named():
    with pytest.raises(ValueError, match="image 42: cannot decode"):
        make_embedder().embed_images([(1, IMAGES[1][1]), (42, b"not a jpeg")])


def test_demo_embedder_is_deterministic_and_loud():
    with pytest.warns(UserWarning, match="MEANINGLESS"):
        a = demo_embedder(seed=0, progress=False, num_workers=0)
    with pytest.warns(UserWarning):
        b = demo_embedder(seed=0, progress=False, num_workers=0)
        c = demo_embedder(seed=1, progress=False, num_workers=0)
    assert a.identity == b.identity != c.identity
    np.testing.assert_array_equal(a.embed_texts(TEXTS), b.embed_texts(TEXTS))
    np.testing.assert_array_equal(a.embed_images(IMAGES[:2]), b.embed_images(IMAGES[:2]))
    assert not np.allclose(a.embed_texts(TEXTS), c.embed_texts(TEXTS))
    tokens = a.tokenizer("The man on the LEFT")["input_ids"]
    assert tokens[0] == a.tokenizer.bos_token_id and tokens[-1] == a.tokenizer.eos_token_id
    assert a.tokenizer.unk_token_id not in tokens
