"""TAS's proposal score and spatial rectifier, as plain functions on L2-normalised embeddings.

Formulas as in TAS (suoych/TAS, ``tas_main.py``): every term is CLIP's logit scale times a cosine,

- ``S_v = scale * crop . text`` (the proposal's masked crop against the expression),
- ``P = scale * caption . text`` (the proposal's caption against the expression),
- ``N = mean_j scale * crop . phrase_j`` (the crop against "a photo of {phrase}" for m negative phrases),
- ``S = w0 * S_v + w1 * P - w2 * N``, min-max normalised over the image's proposals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TAS_WEIGHTS = (1.0, 0.1, 0.7)
CLIP_LOGIT_SCALE = 100.0

# TAS's word lists. "bottom" is not among TAS's bottom words and "under" only serves its relation
# branch (which this module does not have): both kept as TAS has them.
LEFT_WORDS = frozenset({"left", "west", "leftmost", "western"})
RIGHT_WORDS = frozenset({"right", "rightmost", "east", "eastern"})
TOP_WORDS = frozenset({"above", "north", "top"})
BOTTOM_WORDS = frozenset({"below", "south", "underneath"})


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

    Words naming both sides of one axis cancel each other on that axis.
    """
    lowered = {w.lower() for w in words}
    vertical = ("top" if lowered & TOP_WORDS else None, "bottom" if lowered & BOTTOM_WORDS else None)
    horizontal = ("left" if lowered & LEFT_WORDS else None, "right" if lowered & RIGHT_WORDS else None)
    pick = lambda pair: pair[0] if pair[1] is None else (pair[1] if pair[0] is None else None)  # noqa: E731
    return pick(vertical), pick(horizontal)


def spatial_rectify(scores: np.ndarray, centroids: np.ndarray, words: Sequence[str]) -> int:
    """Index of the chosen proposal: TAS's spatial rectifier, else the argmax of ``scores``.

    ``centroids`` (n, 2) as (y, x). The proposals are split at the median centroid row and column:
    top = row < median, left = column < median (so bottom and right include the median). A corner
    word pair picks the best proposal of that quadrant; one side picks the better of its two quadrants'
    bests. An empty quadrant never wins (TAS gives it weight 0 against softmaxed scores, which are all
    positive); when every named quadrant is empty, the global argmax. Ties go to the lower index.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    best = int(np.argmax(scores))
    vertical, horizontal = spatial_side(words)
    if vertical is None and horizontal is None:
        return best
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.shape != (scores.size, 2):
        raise ValueError(f"centroids must be ({scores.size}, 2) as (y, x), got {centroids.shape}")
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
