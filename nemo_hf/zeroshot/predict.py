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
from .crops import blurred_crop, centroid, gaussian_blur, masked_crop
from .encode import ClipEncoder, ImageFeatures
from .scoring import CLIP_LOGIT_SCALE, TAS_WEIGHTS, spatial_rectify, tas_scores


class Proposer(Protocol):
    name: str
    label: str
    oracle: bool

    def __call__(self, image: np.ndarray, objects: Sequence[dict], where: str) -> np.ndarray: ...


class NegativeSource(Protocol):
    name: str

    def negatives(self, features: ImageFeatures, expression: str) -> np.ndarray: ...


def expression_words(sentence: str, tokens: Sequence[str] | None = None) -> list[str]:
    """The refer tokens when present, else the lowercase words of the sentence."""
    return [str(t).lower() for t in tokens] if tokens else re.findall(r"[a-z]+", sentence.lower())


class TasPredictor:
    """TAS on one CLIP: ``image_features`` once per image, then ``choose`` per expression.

    ``negatives`` (a `phrases` source) adds N, ``captioner`` adds P; without them the term is 0.
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
    ):
        self.encoder, self.proposer, self.negatives, self.captioner = encoder, proposer, negatives, captioner
        self.weights, self.logit_scale = tuple(weights), float(logit_scale)
        self.timings: Counter = Counter()

    def __repr__(self) -> str:
        return (
            f"TasPredictor(proposals={self.proposer.name!r}, negatives={getattr(self.negatives, 'name', None)!r}, "
            f"captioner={getattr(self.captioner, 'name', None)!r}, weights={self.weights})"
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
        }

    def cache_key(self) -> dict:
        """What the per-image features depend on (the proposer's repr carries its settings)."""
        return {
            "encoder": self.encoder.cache_key(),
            "proposals": repr(self.proposer),
            "captioner": getattr(self.captioner, "name", None),
        }

    def _tick(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] += now - since
        return now

    def image_features(self, image: np.ndarray, objects: Sequence[dict], where: str) -> ImageFeatures:
        """Proposals, their crops' embeddings, centroids and the whole image's embedding (one batch)."""
        start = time.perf_counter()
        masks = self.proposer(image, objects, where)
        crops = [masked_crop(image, mask) for mask in masks]
        rles = [encode_rle(mask) for mask in masks]
        centroids = np.array([centroid(mask) for mask in masks], dtype=np.float64).reshape(-1, 2)
        start = self._tick("crops", start)
        emb = self.encoder.encode_images(crops + [image])
        start = self._tick("image forward", start)
        features = ImageFeatures(image.shape[:2], rles, emb[:-1], centroids, emb[-1])
        if self.captioner is not None:
            blurred = gaussian_blur(image)
            captions = self.captioner.caption([blurred_crop(image, mask, blurred) for mask in masks] + [image])
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
        """Index of the chosen proposal, None when the image has none."""
        if not features.masks:
            return None
        return spatial_rectify(self.scores(features, expression, text_emb), features.centroids, words)
