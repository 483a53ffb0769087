"""SAM proposals, the captioner, crop embedding counts and the negative phrases, on tiny random models."""

import dataclasses
import warnings

import numpy as np
import pytest
from zeroshot_models import tiny_captioner, tiny_sam

from nemo_hf.mining.embed import demo_embedder
from nemo_hf.masks import encode_rle
from nemo_hf.zeroshot.captioner import Captioner
from nemo_hf.zeroshot.encode import ClipEncoder, FeatureCache
from nemo_hf.zeroshot.phrases import COCO_CATEGORY_NAMES, VocabularyNegatives, load_spacy
from nemo_hf.zeroshot.predict import TasPredictor
from nemo_hf.zeroshot.proposals import InstanceProposals, SamProposals, remove_small_regions


def _image(h=120, w=160, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    smooth = np.stack([(xx * 1.5) % 256, (yy * 2) % 256, ((xx + yy) * 0.7) % 256], -1)
    return (smooth + rng.integers(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def encoder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClipEncoder(demo_embedder(seed=0, progress=False, num_workers=0, batch_size=4))


def test_sam_proposals_with_tiny_random_sam():
    model, processor = tiny_sam()
    image = _image()
    # TAS's settings on an untrained SAM: predicted IoUs are ~0, so nothing passes 0.7
    tas = SamProposals(model, processor, "tiny")
    assert tas.name == "sam:tiny" and not tas.oracle
    assert tas(image, [], "image 1").shape == (0, 120, 160)
    # every threshold off: the whole path runs (grid prompts, upscaling, NMS, small regions, TAS's filter)
    loose = SamProposals(model, processor, "tiny", points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0)
    masks = loose(image, [], "image 1")
    assert masks.ndim == 3 and masks.shape[1:] == (120, 160) and masks.dtype == bool
    areas = masks.reshape(len(masks), -1).sum(1)
    assert (areas >= 2000).all()
    for i in range(len(masks)):  # TAS's filter held: no pair overlaps by more than 0.4 of the smaller
        for j in range(i + 1, len(masks)):
            assert (masks[i] & masks[j]).sum() <= 0.4 * min(areas[i], areas[j])


def test_remove_small_regions_fills_holes_and_drops_islands():
    mask = np.zeros((60, 60), dtype=bool)
    mask[5:45, 5:45] = True  # 1600 px body
    mask[20:25, 20:25] = False  # a 25-px hole
    mask[50:53, 50:53] = True  # a 9-px island
    mask[0:2, 58:60] = True  # 4-px island touching the corner
    out = remove_small_regions(mask, 800)
    expected = np.zeros((60, 60), dtype=bool)
    expected[5:45, 5:45] = True
    np.testing.assert_array_equal(out, expected)
    # only small islands: the largest stays
    islands = np.zeros((30, 30), dtype=bool)
    islands[0:3, 0:3] = islands[10:20, 10:12] = True
    np.testing.assert_array_equal(remove_small_regions(islands, 800), np.pad(np.ones((10, 2), bool), ((10, 10), (10, 18))))


def test_captioner_adds_p_and_everything_survives_the_cache(encoder, tmp_path):
    model, processor, tokenizer = tiny_captioner()
    captioner = Captioner(model, processor, tokenizer, "tiny-captioner", batch_size=2)
    captions = captioner.caption([_image(40, 30), _image(20, 50, 1), _image(32, 32, 2)])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captioner.caption([_image(40, 30)]) == captions[:1]  # greedy: deterministic

    image = _image()
    predictor = TasPredictor(encoder, InstanceProposals(), VocabularyNegatives(encoder), captioner)
    features = predictor.image_features(image, _objects(image.shape[:2], [(0, 60, 0, 80), (60, 120, 80, 160)]), "image 1")
    assert len(features.captions) == 2 and isinstance(features.whole_caption, str)
    np.testing.assert_allclose(features.caption_emb, encoder.encode_texts(features.captions))
    text = encoder.encode_texts(["a man"])[0]
    with_p = predictor.scores(features, "a man", text, normalise=False)
    without_p = predictor.scores(dataclasses.replace(features, caption_emb=None), "a man", text, normalise=False)
    np.testing.assert_allclose(with_p - without_p, 0.1 * 100 * features.caption_emb @ text, rtol=1e-5, atol=1e-4)

    cache = FeatureCache(tmp_path, predictor.cache_key())
    cache.put(7, "content", features)
    back = cache.get(7, "content")
    assert back.size == features.size and back.masks == features.masks and back.captions == features.captions
    assert back.whole_caption == features.whole_caption
    for name in ("crop_emb", "centroids", "image_emb", "caption_emb"):
        np.testing.assert_array_equal(getattr(back, name), getattr(features, name))
    (cache.directory / "8.npz").write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="dropping unreadable"):
        assert cache.get(8, "content") is None
    assert not (cache.directory / "8.npz").exists()


def _objects(shape, boxes):
    out = []
    for ann_id, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        mask = np.zeros(shape, np.uint8)
        mask[y0:y1, x0:x1] = 1
        out.append({"ann_id": ann_id, "category_id": 1, "category": "person", "mask": encode_rle(mask)})
    return out


def test_each_crop_is_embedded_once_per_image(encoder):
    """Features are computed per image; however many expressions, the image model runs once per crop."""
    image = _image()
    objects = _objects(image.shape[:2], [(0, 60, 0, 80), (60, 120, 80, 160), (10, 50, 100, 150)])
    calls = []
    model = encoder.embedder.model
    original = model.get_image_features

    def counting(pixel_values):
        calls.append(len(pixel_values))
        return original(pixel_values=pixel_values)

    model.get_image_features = counting
    try:
        predictor = TasPredictor(encoder, InstanceProposals(), negatives=VocabularyNegatives(encoder))
        features = predictor.image_features(image, objects, "image 1")
        assert sum(calls) == 3 + 1 and calls == [4]  # three crops and the whole image, one batch of 4
        texts = ["the man on the left", "right person", "top guy", "a person", "man", "woman", "left one"]
        text_emb = encoder.encode_texts(texts)
        picks = [predictor.choose(features, t, t.split(), e) for t, e in zip(texts, text_emb)]
        assert sum(calls) == 4  # seven expressions later: no image forward at all
        assert all(0 <= k < 3 for k in picks)
        assert picks[0] == 0 and picks[1] in (1, 2)  # "left": object 0 is the only one left of the median column
    finally:
        del model.get_image_features
    assert features.crop_emb.shape == (3, encoder.dim) and features.centroids.shape == (3, 2)
    np.testing.assert_allclose(np.linalg.norm(features.crop_emb, axis=1), 1, atol=1e-5)


def test_vocabulary_negatives_use_the_image_and_drop_the_head(encoder):
    negatives = VocabularyNegatives(encoder, m=5, synonym_threshold=0.9)
    assert negatives.prompt_emb.shape == (80, encoder.dim) and len(COCO_CATEGORY_NAMES) == 80
    image = _image()
    predictor = TasPredictor(encoder, InstanceProposals())
    features = predictor.image_features(image, _objects(image.shape[:2], [(0, 60, 0, 80)]), "image 1")
    top = negatives.top(features)
    expected = np.argsort(-(negatives.prompt_emb @ features.image_emb), kind="stable")[:5]
    np.testing.assert_array_equal(top, expected)
    # an expression whose head is one of the top names drops that name (cosine 1 with itself), and only names
    # at least that close to the head
    head = COCO_CATEGORY_NAMES[top[0]]
    kept = negatives.negatives(features, f"the {head} on the left")
    head_emb = encoder.encode_texts([negatives.prompt(head)])[0]
    close = negatives.prompt_emb[top] @ head_emb > 0.9
    assert close[0] and len(kept) == int((~close).sum())
    np.testing.assert_allclose(kept, negatives.prompt_emb[top][~close])
    with pytest.raises(ValueError, match="m must be"):
        VocabularyNegatives(encoder, m=0)


def test_spacy_missing_fails_clearly():
    try:
        import spacy  # noqa: F401
    except ImportError:
        with pytest.raises(OSError, match="pip install spacy"):
            load_spacy("en_core_web_sm")
    else:
        with pytest.raises(OSError, match="cannot load the model 'no_such_model_xyz'"):
            load_spacy("no_such_model_xyz")


def test_caption_noun_chunks_drop_the_head_synonyms(encoder):
    """TAS's phrases with a stand-in for a spaCy pipeline (no spaCy model can be installed here): noun chunks
    of the whole image's caption as "a photo of {chunk}", minus those close to the expression's first chunk."""
    from types import SimpleNamespace

    from nemo_hf.zeroshot.phrases import CaptionNounChunks

    def nlp(text):  # noun chunks = comma-separated parts
        return SimpleNamespace(noun_chunks=[SimpleNamespace(text=part.strip()) for part in text.split(",")])

    chunks = CaptionNounChunks(encoder, nlp, synonym_threshold=0.999)
    image = _image()
    features = TasPredictor(encoder, InstanceProposals()).image_features(image, _objects(image.shape[:2], [(0, 60, 0, 80)]), "i")
    with pytest.raises(ValueError, match="--captioner"):
        chunks.negatives(features, "man")
    features.whole_caption = "a man, a red car, a dog"
    kept = chunks.negatives(features, "a red car, on the left")
    expected = encoder.encode_texts(["a photo of a man", "a photo of a dog"])
    np.testing.assert_allclose(kept, expected)  # "a red car" is the head itself: dropped


def test_an_image_without_proposals_round_trips_and_predicts_nothing(encoder, tmp_path):
    image = _image()
    predictor = TasPredictor(encoder, InstanceProposals(), VocabularyNegatives(encoder))
    features = predictor.image_features(image, [], "image 1")
    assert features.masks == [] and features.crop_emb.shape == (0, encoder.dim)
    cache = FeatureCache(tmp_path, predictor.cache_key())
    cache.put(1, "content", features)
    back = cache.get(1, "content")
    assert back.size == (120, 160) and back.masks == [] and back.centroids.shape == (0, 2)
    assert predictor.choose(back, "the man", ["the", "man"], encoder.encode_texts(["the man"])[0]) is None
