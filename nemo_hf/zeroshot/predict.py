"""TAS zero-shot prediction: per image, proposals and their features once; per expression, a score and a pick."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..masks import encode_rle
from .captioner import Captioner
from .crops import CROP_BOXES, blurred_crop, centroid, gaussian_blur, masked_crop
from .encode import ClipEncoder, ImageFeatures, image_content
from .gate import TasParse
from .scoring import CLIP_LOGIT_SCALE, RECTIFY_RULES, TAS_WEIGHTS, spatial_rectify, tas_relation_rectify, tas_scores


class Proposer(Protocol):
    name: str
    label: str
    oracle: bool
    reads_objects: bool  # whether its proposals depend on the image's instances (then they key the cache too)

    def cache_key(self) -> dict: ...

    def __call__(self, image: np.ndarray, objects: Sequence[dict], where: str) -> np.ndarray: ...


class NegativeSource(Protocol):
    name: str

    def negatives(self, features: ImageFeatures, expression: str) -> np.ndarray: ...


class RectifierGate(Protocol):
    name: str

    def __call__(self, sentence: str) -> TasParse: ...


WORDS_ONLY_GATE = (
    "words only (no spaCy parse): every sentence with a spatial word takes TAS's superlative branch; TAS "
    "takes it only when its spaCy parse finds the head noun phrase with a superlative and no relation, and "
    "its relation branch for relations (--phrases spacy follows both)"
)


def expression_words(sentence: str, tokens: Sequence[str] | None = None) -> list[str]:
    """The refer tokens when present, else the lowercase words of the sentence."""
    return [str(t).lower() for t in tokens] if tokens else re.findall(r"[a-z]+", sentence.lower())


class TasPredictor:
    """TAS on one CLIP: ``image_features`` once per image, then ``choose`` per expression.

    ``negatives`` (a `phrases` source) adds N, ``captioner`` adds P; without them the term is 0.
    ``rectifier`` is the `spatial_rectify` rule (``tas`` or ``words``); ``gate`` (`gate.SpacyParseGate`)
    parses each sentence as TAS does and picks TAS's branch (superlative, relation or none): without one,
    every sentence with a spatial word is rectified (TAS's superlative branch). ``crop_box`` is the
    `crops.crop_box` of the proposal crops.
    ``timings`` accumulates seconds per stage (crops, image forward, captions, text forward).
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        proposer: Proposer,
        negatives: NegativeSource | None = None,
        captioner: Captioner | None = None,
        weights: Sequence[float] = TAS_WEIGHTS,
        logit_scale: float = CLIP_LOGIT_SCALE,
        rectifier: str = "tas",
        gate: RectifierGate | None = None,
        crop_box: str = "tas",
    ):
        if rectifier not in RECTIFY_RULES:
            raise ValueError(f"rectifier {rectifier!r}: expected one of {', '.join(RECTIFY_RULES)}")
        if crop_box not in CROP_BOXES:
            raise ValueError(f"crop box {crop_box!r}: expected one of {', '.join(CROP_BOXES)}")
        self.encoder, self.proposer, self.negatives, self.captioner = encoder, proposer, negatives, captioner
        self.weights, self.logit_scale = tuple(weights), float(logit_scale)
        self.rectifier, self.gate, self.crop_box = rectifier, gate, crop_box
        self.timings: Counter = Counter()

    def __repr__(self) -> str:
        return (
            f"TasPredictor(proposals={self.proposer.name!r}, negatives={getattr(self.negatives, 'name', None)!r}, "
            f"captioner={getattr(self.captioner, 'name', None)!r}, weights={self.weights}, "
            f"rectifier={self.rectifier!r}, gate={self.gate!r}, crop_box={self.crop_box!r})"
        )

    def describe(self) -> dict:
        """Provenance: what produced the predictions (goes into every report)."""
        return {
            "method": "TAS (training-free; S = w0*S_v + w1*P - w2*N, spatial rectifier)",
            "model": self.encoder.embedder.identity.as_dict(),
            "proposals": self.proposer.label,
            "oracle_proposals": bool(self.proposer.oracle),
            "negative_phrases": getattr(self.negatives, "name", None),
            "captioner": getattr(self.captioner, "name", None),
            "weights": list(self.weights),
            "logit_scale": self.logit_scale,
            "spatial_rectifier": self.rectifier,
            "rectifier_gate": WORDS_ONLY_GATE if self.gate is None else self.gate.name,
            "crop_box": self.crop_box,
        }

    def cache_key(self) -> dict:
        """What the per-image features depend on: the models' weights and dtypes, the proposer's settings."""
        return {
            "encoder": self.encoder.cache_key(),
            "proposals": self.proposer.cache_key(),
            "captioner": None if self.captioner is None else self.captioner.cache_key(),
            "crop_box": self.crop_box,
        }

    def image_content(self, data: bytes | memoryview, objects: Sequence[dict]) -> str:
        """What one image's cached features depend on besides `cache_key`: its bytes, and its instances when
        the proposer reads them."""
        return image_content(data, list(objects) if getattr(self.proposer, "reads_objects", True) else None)

    def _tick(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] += now - since
        return now

    def image_features(self, image: np.ndarray, objects: Sequence[dict], where: str) -> ImageFeatures:
        """Proposals, their crops' embeddings, centroids and the whole image's embedding (one batch)."""
        start = time.perf_counter()
        masks = self.proposer(image, objects, where)
        crops = [masked_crop(image, mask, box=self.crop_box) for mask in masks]
        rles = [encode_rle(mask) for mask in masks]
        centroids = np.array([centroid(mask) for mask in masks], dtype=np.float64).reshape(-1, 2)
        start = self._tick("crops", start)
        emb = self.encoder.encode_images(crops + [image])
        start = self._tick("image forward", start)
        features = ImageFeatures(image.shape[:2], rles, emb[:-1], centroids, emb[-1])
        if self.captioner is not None:
            blurred = gaussian_blur(image)
            blurred_crops = [blurred_crop(image, mask, blurred, self.crop_box) for mask in masks]
            captions = self.captioner.caption(blurred_crops + [image])
            features.captions, features.whole_caption = captions[:-1], captions[-1]
            features.caption_emb = self.encoder.encode_texts(features.captions).reshape(-1, self.encoder.dim)
            self._tick("captions", start)
        return features

    def prepare(self, expressions: Sequence[str]) -> None:
        """Batch the per-expression text work of the negative phrases ahead of `choose`."""
        prepare = getattr(self.negatives, "prepare", None)
        if prepare is not None:
            start = time.perf_counter()
            prepare(list(expressions))
            self._tick("text forward", start)

    def scores(self, features: ImageFeatures, expression: str, text_emb: np.ndarray, normalise: bool = True) -> np.ndarray:
        """S per proposal for one expression (min-max normalised unless ``normalise=False``)."""
        negative_emb = None if self.negatives is None else self.negatives.negatives(features, expression)
        return tas_scores(
            features.crop_emb, text_emb, features.caption_emb, negative_emb, self.logit_scale, self.weights,
            normalise=normalise,
        )  # fmt: skip

    def choose(self, features: ImageFeatures, expression: str, words: Sequence[str], text_emb: np.ndarray) -> int | None:
        """Index of the chosen proposal, None when the image has none. The ``tas`` rule reads the sentence
        (TAS tests substrings of it), ``words`` the words; a parse that takes neither of TAS's branches
        leaves the plain argmax."""
        if not features.masks:
            return None
        scores = self.scores(features, expression, text_emb)
        parse = None if self.gate is None else self.gate(expression)
        if parse is not None and parse.branch == "relation" and self.rectifier == "tas":
            return tas_relation_rectify(scores, features.centroids, expression, parse.relations, parse.head)
        text = expression if self.rectifier == "tas" else words
        if parse is not None and parse.branch == "none":
            text = ""  # no spatial word: the argmax, under the rule's own tie-breaking
        return spatial_rectify(scores, features.centroids, text, self.rectifier)
