"""Negative phrases for TAS's N term: what else is in the image, minus what the expression is about.

TAS takes spaCy noun chunks of a BLIP-2 caption of the whole image and drops WordNet near-synonyms of
the target's head noun. No trustworthy spaCy English model can be assumed installed, so the default here
(`VocabularyNegatives`) works offline with the scoring CLIP alone: the 80 COCO category names, as
"a photo of a {name}", scored against the whole image; the top m are the image's negative phrases, minus
those whose prompt embedding is within ``synonym_threshold`` (cosine) of the expression's head phrase in
the same template. The image's annotations (its categories, the other refs' expressions) are never used:
that would leak ground truth into a zero-shot number. `CaptionNounChunks` is TAS's way (`--phrases spacy`).
"""

from __future__ import annotations

import re

import numpy as np

from .encode import ClipEncoder, ImageFeatures

COCO_CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# Shared prompt templates put every CLIP text embedding in a narrow cone: different classes commonly sit
# above 0.8 cosine. 0.9 drops only near-synonyms (a starting value, not measured on real weights here:
# none are available offline; tune it with --synonym-threshold).
SYNONYM_THRESHOLD = 0.9
NEGATIVE_PHRASES = 3  # TAS's captions give a handful of noun chunks

_DETERMINERS = frozenset("a an the this that these those".split())
# Where a RefCOCO expression's head phrase ends: a preposition, a relative word or a participle.
_HEAD_ENDS = frozenset(
    "in on at with of to from by near next behind under over above below beside between against "
    "that who which whose where and or wearing holding sitting standing walking looking facing".split()
)


def head_phrase(expression: str) -> str:
    """The expression's words before its first preposition / relative word / participle, determiners dropped
    ("the man in red on the left" -> "man"); the whole expression when that leaves nothing."""
    words = re.findall(r"[a-z0-9']+", expression.lower())
    head: list[str] = []
    for word in words:
        if word in _HEAD_ENDS and head:
            break
        if word not in _DETERMINERS and word not in _HEAD_ENDS:
            head.append(word)
    return " ".join(head) or expression.strip().lower()


def _drop_close(phrase_emb: np.ndarray, head_emb: np.ndarray, threshold: float) -> np.ndarray:
    return phrase_emb[phrase_emb @ head_emb <= threshold] if len(phrase_emb) else phrase_emb


class VocabularyNegatives:
    """The offline default: the top ``m`` of a fixed public vocabulary (COCO's 80 names) against the whole
    image, minus near-synonyms of the expression's head phrase. Uses no annotation of the image."""

    name = "coco-vocabulary"

    def __init__(
        self,
        encoder: ClipEncoder,
        m: int = NEGATIVE_PHRASES,
        synonym_threshold: float = SYNONYM_THRESHOLD,
        vocabulary=COCO_CATEGORY_NAMES,
    ):
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        self.encoder, self.m, self.synonym_threshold = encoder, int(m), float(synonym_threshold)
        self.vocabulary = tuple(vocabulary)
        self.prompt_emb = encoder.encode_texts([self.prompt(name) for name in self.vocabulary])

    def __repr__(self) -> str:
        return f"VocabularyNegatives(m={self.m}, synonym_threshold={self.synonym_threshold}, vocabulary={len(self.vocabulary)} names)"

    @staticmethod
    def prompt(name: str) -> str:
        return f"a photo of a {name}"

    def prepare(self, expressions: list[str]) -> None:
        """Embed the head phrases of many expressions in batches (they are memoised for `negatives`)."""
        self.encoder.encode_texts([self.prompt(head_phrase(e)) for e in expressions])

    def top(self, features: ImageFeatures) -> np.ndarray:
        """Indices into the vocabulary of the ``m`` names that best match the whole image, best first."""
        return np.argsort(-(self.prompt_emb @ features.image_emb), kind="stable")[: self.m]

    def negatives(self, features: ImageFeatures, expression: str) -> np.ndarray:
        """(k, d) embeddings of the negative prompts for this expression (k <= m; may be 0)."""
        order = self.top(features)
        head = self.encoder.encode_texts([self.prompt(head_phrase(expression))])[0]
        return _drop_close(self.prompt_emb[order], head, self.synonym_threshold)


def load_spacy(model: str):
    """A spaCy pipeline, or an error that says what to install."""
    try:
        import spacy
    except ImportError as err:
        raise OSError(
            "--phrases spacy needs spaCy and an English model: pip install spacy, then install a model "
            f"package such as {model} (or use the default --phrases vocabulary, which needs neither)"
        ) from err
    try:
        return spacy.load(model)
    except OSError as err:
        raise OSError(
            f"--phrases spacy: spaCy cannot load the model {model!r} ({err}); install it, or pass "
            "--spacy-model NAME_OR_PATH, or use the default --phrases vocabulary"
        ) from err


class CaptionNounChunks:
    """TAS's negatives: spaCy noun chunks of the captioner's whole-image caption, as "a photo of {chunk}",
    minus those close to the expression's first noun chunk (cosine of the same-template prompts; TAS uses
    WordNet path similarity, which needs NLTK data that is not assumed here)."""

    name = "spacy-noun-chunks"

    def __init__(self, encoder: ClipEncoder, nlp, synonym_threshold: float = SYNONYM_THRESHOLD):
        self.encoder, self.nlp, self.synonym_threshold = encoder, nlp, float(synonym_threshold)

    def __repr__(self) -> str:
        return f"CaptionNounChunks(synonym_threshold={self.synonym_threshold})"

    def chunks(self, text: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(text).noun_chunks]

    def negatives(self, features: ImageFeatures, expression: str) -> np.ndarray:
        if features.whole_caption is None:
            raise ValueError("--phrases spacy needs the whole image's caption: pass --captioner")
        phrases = self.chunks(features.whole_caption)
        heads = self.chunks(expression)
        head = heads[0] if heads else head_phrase(expression)
        emb = self.encoder.encode_texts([f"a photo of {p}" for p in phrases] + [f"a photo of {head}"])
        return _drop_close(emb[:-1], emb[-1], self.synonym_threshold)
