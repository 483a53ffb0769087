"""TAS's proposal score and spatial rectifier, as plain functions on L2-normalised embeddings.

Formulas as in TAS (suoych/TAS, ``tas_main.py``): every term is CLIP's logit scale times a cosine,

- ``S_v = scale * crop . text`` (the proposal's masked crop against the expression),
- ``P = scale * caption . text`` (the proposal's caption against the expression),
- ``N = mean_j scale * crop . phrase_j`` (the crop against "a photo of {phrase}" for m negative phrases),
- ``S = w0 * S_v + w1 * P - w2 * N``, min-max normalised over the image's proposals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TAS_WEIGHTS = (1.0, 0.1, 0.7)
CLIP_LOGIT_SCALE = 100.0

# TAS's word lists (suoych/TAS tas_main.py lines 647-673; the same as ReCLIP's heuristics.py SUPERLATIVES).
# "bottom" is not among TAS's bottom words and "under" only serves its relation branch: kept as TAS has them.
LEFT_WORDS = frozenset({"left", "west", "leftmost", "western"})
RIGHT_WORDS = frozenset({"right", "rightmost", "east", "eastern"})
TOP_WORDS = frozenset({"above", "north", "top"})
BOTTOM_WORDS = frozenset({"below", "south", "underneath"})
# With a bottom word, and in its relation branch, TAS tests only these (tas_main.py lines 658, 660, 721, 723).
SHORT_LEFT_WORDS = ("left", "west")
SHORT_RIGHT_WORDS = ("right", "east")

RECTIFY_RULES = ("tas", "words")


def tas_scores(
    crop_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_emb: np.ndarray | None = None,
    negative_emb: np.ndarray | None = None,
    logit_scale: float = CLIP_LOGIT_SCALE,
    weights: Sequence[float] = TAS_WEIGHTS,
    *,
    normalise: bool = True,
) -> np.ndarray:
    """S per proposal, min-max normalised to [0, 1] (all zeros when every proposal scores the same);
    ``normalise=False`` gives S itself, in logit units (for margins between proposals).

    ``crop_emb`` (n, d), ``text_emb`` (d,), ``caption_emb`` (n, d) or None, ``negative_emb`` (m, d)
    or None; a missing term (None, or no negative phrase) counts as 0.
    """
    crop_emb = np.asarray(crop_emb, dtype=np.float64)
    text_emb = np.asarray(text_emb, dtype=np.float64)
    if crop_emb.ndim != 2 or text_emb.shape != crop_emb.shape[1:]:
        raise ValueError(f"crop_emb must be (n, d) and text_emb (d,), got {crop_emb.shape} and {text_emb.shape}")
    w_visual, w_caption, w_negative = (float(w) for w in weights)
    score = w_visual * logit_scale * (crop_emb @ text_emb)
    if caption_emb is not None:
        caption_emb = np.asarray(caption_emb, dtype=np.float64)
        if caption_emb.shape != crop_emb.shape:
            raise ValueError(f"caption_emb must be {crop_emb.shape} (one per proposal), got {caption_emb.shape}")
        score = score + w_caption * logit_scale * (caption_emb @ text_emb)
    if negative_emb is not None and len(negative_emb):
        negative_emb = np.asarray(negative_emb, dtype=np.float64)
        score = score - w_negative * logit_scale * (crop_emb @ negative_emb.T).mean(axis=1)
    if score.size == 0 or not normalise:
        return score
    low, span = score.min(), score.max() - score.min()
    return (score - low) / span if span > 0 else np.zeros_like(score)


def spatial_side(words: Sequence[str]) -> tuple[str | None, str | None]:
    """(``"top"``/``"bottom"``/None, ``"left"``/``"right"``/None) named by an expression's words.

    Whole words only, and words naming both sides of one axis cancel each other on that axis
    (the ``words`` rule; TAS's own rule is `tas_rectify`).
    """
    lowered = {w.lower() for w in words}
    vertical = ("top" if lowered & TOP_WORDS else None, "bottom" if lowered & BOTTOM_WORDS else None)
    horizontal = ("left" if lowered & LEFT_WORDS else None, "right" if lowered & RIGHT_WORDS else None)
    pick = lambda pair: pair[0] if pair[1] is None else (pair[1] if pair[0] is None else None)  # noqa: E731
    return pick(vertical), pick(horizontal)


def tas_weights(scores: np.ndarray) -> np.ndarray:
    """TAS's weights: the softmax of the min-max scores in float32 (tas_main.py line 609, on CUDA), computed
    as PyTorch's CUDA softmax does, ``exp(x - max) / sum``. Float32 can tie scores that differ in their last
    bits; TAS's tie rules then decide. Scores a few ulps apart may tie or not depending on the kernel's
    summation order (PyTorch's CPU softmax over dim 0 differs again): there TAS cannot be matched bit for bit."""
    scores = np.asarray(scores, dtype=np.float32)
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum(dtype=np.float32)


def _check(scores: np.ndarray, centroids) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.shape != (scores.size, 2):
        raise ValueError(f"centroids must be ({scores.size}, 2) as (y, x), got {centroids.shape}")
    return scores, centroids


class TasParts:
    """TAS's four parts of the proposals and each part's best (tas_main.py lines 609-633).

    - Weights: `tas_weights` of ``scores``; ``best`` is their first argmax (line 611).
    - Centroids truncated to integers as TAS stores them (``int(np.mean(rows))``, lines 521-523) and split
      at their medians (lines 614-621): part 1 top-left (row < median row, column < median column),
      2 bottom-left, 3 top-right, 4 bottom-right (bottom and right include the medians).
    - Each part's best is its first maximum weight; an empty part weighs 0 and stands for ``best``
      (lines 630-633). `better` is the first part's best only when strictly heavier (``>``).
    """

    def __init__(self, scores: np.ndarray, centroids: np.ndarray):
        scores, centroids = _check(scores, centroids)
        self.weights = tas_weights(scores)
        self.best = int(np.argmax(self.weights))
        rows, cols = np.trunc(centroids[:, 0]), np.trunc(centroids[:, 1])
        top, left = rows < np.median(rows), cols < np.median(cols)
        self.parts = [top & left, ~top & left, top & ~left, ~top & ~left]

    def part_best(self, k: int) -> tuple[float, int]:
        """(weight, index) of part ``k`` (1..4)."""
        members = np.flatnonzero(self.parts[k - 1])
        if members.size == 0:
            return 0.0, self.best
        j = int(members[np.argmax(self.weights[members])])
        return float(self.weights[j]), j

    def __getitem__(self, k: int) -> int:
        return self.part_best(k)[1]

    def better(self, a: int, b: int) -> int:
        (weight_a, index_a), (weight_b, index_b) = self.part_best(a), self.part_best(b)
        return index_a if weight_a > weight_b else index_b


def _named(sentence: str):
    text = sentence.lower()
    return lambda words: any(word in text for word in words)


def tas_rectify(scores: np.ndarray, centroids: np.ndarray, sentence: str) -> int:
    """TAS's spatial rectifier (suoych/TAS tas_main.py lines 607-679, superlative branch), rule for rule,
    on `TasParts`. Words are substrings of the lower-cased sentence ("bright" counts as right, "laptop" as
    top), tested in TAS's order (lines 647-679): a top word first (then left -> part 1, right -> part 3,
    else the better of 1 and 3); else a bottom word (then only "left"/"west" -> 2, "right"/"east" -> 4, else
    the better of 2 and 4); else left (the better of 1 and 2), else right (the better of 3 and 4); else the
    argmax of the weights.

    Whether TAS reaches this branch depends on its spaCy parse (`gate.tas_parse`); without a parse,
    nemo_hf takes it for every sentence.
    """
    parts, named = TasParts(scores, centroids), _named(sentence)
    if named(TOP_WORDS):
        return parts[1] if named(LEFT_WORDS) else parts[3] if named(RIGHT_WORDS) else parts.better(1, 3)
    if named(BOTTOM_WORDS):
        return parts[2] if named(SHORT_LEFT_WORDS) else parts[4] if named(SHORT_RIGHT_WORDS) else parts.better(2, 4)
    if named(LEFT_WORDS):
        return parts.better(1, 2)
    if named(RIGHT_WORDS):
        return parts.better(3, 4)
    return parts.best


# TAS's relation branch reads ReCLIP's RELATIONS keywords (heuristics.py lines 17-20), whole words.
RELATION_SIDES = (("left", "west"), ("right", "east"), ("above", "north", "top"), ("below", "south", "under"))
RELATION_BOTTOM_WORDS = ("below", "south", "under")


def tas_relation_rectify(
    scores: np.ndarray, centroids: np.ndarray, sentence: str, relations: Sequence[tuple[Sequence[str], str]], head: str
) -> int:
    """TAS's relation branch (tas_main.py lines 681-746), taken when its parse finds relations and no
    superlative: ``relations`` are (the words that link the head to another entity, that entity's head
    chunk), ``head`` the head chunk. Relations are read in order and a later one overrides an earlier one.
    In each, the first word that is a side keyword decides (a side word of the sentence, as substrings,
    picks the part; else the better of the two parts on that side), provided the other entity is the head
    itself or holds the word ("the left" in "man on the left"); a link with no words is skipped.
    """
    parts, named = TasParts(scores, centroids), _named(sentence)
    index = parts.best
    for words, other in relations:
        side = next((k for w in words for k, keys in enumerate(RELATION_SIDES) if w in keys), None)
        word = next((w for w in words if any(w in keys for keys in RELATION_SIDES)), None)
        if side is None or not (other == head or word in other):
            continue
        if side == 0:
            index = parts[1] if named(TOP_WORDS) else parts[2] if named(RELATION_BOTTOM_WORDS) else parts.better(1, 2)
        elif side == 1:
            index = parts[3] if named(TOP_WORDS) else parts[4] if named(RELATION_BOTTOM_WORDS) else parts.better(3, 4)
        elif side == 2:
            index = parts[1] if named(SHORT_LEFT_WORDS) else parts[3] if named(SHORT_RIGHT_WORDS) else parts.better(1, 3)
        else:
            index = parts[2] if named(SHORT_LEFT_WORDS) else parts[4] if named(SHORT_RIGHT_WORDS) else parts.better(2, 4)
    return index


def words_rectify(scores: np.ndarray, centroids: np.ndarray, words: Sequence[str]) -> int:
    """nemo_hf's cleaner rule (``rule="words"``): whole words (`spatial_side`, contradictory sides cancel),
    float centroids split at their medians (top = row < median, left = column < median), and the best of
    the named quadrants by ``scores``; ties go to the lower index, and when every named quadrant is empty,
    the global argmax."""
    scores, centroids = _check(scores, centroids)
    best = int(np.argmax(scores))
    vertical, horizontal = spatial_side(words)
    if vertical is None and horizontal is None:
        return best
    top = centroids[:, 0] < np.median(centroids[:, 0])
    left = centroids[:, 1] < np.median(centroids[:, 1])
    allowed = np.ones(scores.size, dtype=bool)
    if vertical is not None:
        allowed &= top if vertical == "top" else ~top
    if horizontal is not None:
        allowed &= left if horizontal == "left" else ~left
    if not allowed.any():
        return best
    # The better of the named quadrants' bests is the best over their union (ties: the lower index).
    return int(np.flatnonzero(allowed)[np.argmax(scores[allowed])])


def spatial_rectify(scores: np.ndarray, centroids: np.ndarray, text: str | Sequence[str], rule: str = "tas") -> int:
    """Index of the chosen proposal: the spatial rectifier, else the argmax of ``scores``.

    ``scores`` are `tas_scores` (min-max normalised), ``centroids`` (n, 2) as (row, column) means of the
    masks, ``text`` the expression: its sentence, or its words (joined by spaces for ``rule="tas"``).
    ``rule="tas"`` (default) is TAS's rectifier (`tas_rectify`), ``"words"`` nemo_hf's whole-word rule
    (`words_rectify`).
    """
    if rule == "tas":
        return tas_rectify(scores, centroids, text if isinstance(text, str) else " ".join(text))
    if rule == "words":
        return words_rectify(scores, centroids, re.findall(r"[a-z]+", text.lower()) if isinstance(text, str) else text)
    raise ValueError(f"rule {rule!r}: expected one of {', '.join(RECTIFY_RULES)}")
