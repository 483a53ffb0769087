"""What a NeMo mosaic shows: its sentence, mode, target cell and negative tiles, drawn per sample.

All the draws of a sample come from one generator seeded by (seed, epoch, ref_id), so a sample is the
same whatever the DataLoader workers and changes every epoch. `NeMoMosaic` makes them in this order:
`draw_sentence`, `draw_mode`, `draw_grid`, `draw_cell`, `draw_negatives`; another order would give other samples.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .geometry import Placement

MODES = ("single", "random", "retrieval")

# Whole words that pin the target to a side of the grid: the first or last column, the first or last row
# (the official loader's list; for 2x2, tiles row-major 0 TL, 1 TR, 2 BL, 3 BR).
SPATIAL_WORDS = {
    "left": "left",
    "right": "right",
    **{w: "top" for w in ("top", "high", "above")},
    **{w: "bottom" for w in ("bottom", "low", "below", "under", "beneath")},
}


@dataclass(frozen=True)
class Warmup:
    """Before epoch ``epochs``, a sample is a random mosaic with probability ``p_random`` (else single).

    The official loader's schedule: easy random mosaics first, the mode probabilities ``p`` after.
    """

    epochs: int
    p_random: float = 1.0

    def probabilities(self, epoch: int, after: dict[str, float]) -> dict[str, float]:
        """The mode probabilities at ``epoch``: the random/single mix during the warm-up, ``after`` it."""
        if epoch < self.epochs:
            return {"single": 1.0 - self.p_random, "random": self.p_random, "retrieval": 0.0}
        return after


def normalise_p(p: Mapping[str, float]) -> dict[str, float]:
    """Mode probabilities checked and scaled to sum to 1, every mode of MODES a key."""
    unknown = set(p) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)} in p; expected keys among {MODES}")
    numbers = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in p.values())
    if not numbers or not all(math.isfinite(v) and v >= 0 for v in p.values()) or sum(p.values()) <= 0:
        raise ValueError(f"mode probabilities must be finite, non-negative and not all zero, got {dict(p)}")
    total = sum(p.values())
    return {mode: p.get(mode, 0.0) / total for mode in MODES}


def spatial_quadrants(words: Sequence[str], grid: int = 2) -> list[int]:
    """Cells (row-major) the target may take in a ``grid`` x ``grid`` mosaic given an expression's words:
    "left" the first column, "right" the last, "top" the first row, "bottom" the last; contradictory
    or none: every cell."""
    cells = set(range(grid * grid))
    sides = {
        "left": {c for c in cells if c % grid == 0},
        "right": {c for c in cells if c % grid == grid - 1},
        "top": {c for c in cells if c // grid == 0},
        "bottom": {c for c in cells if c // grid == grid - 1},
    }
    allowed = set(cells)
    for word in words:
        side = SPATIAL_WORDS.get(word.lower())
        if side is not None:
            allowed &= sides[side]
    return sorted(allowed) or sorted(cells)


def check_seed(value, name: str = "seed") -> int:
    """``value`` (a seed, an epoch) as an int >= 0, what seeds the draws: a float (even 3.0, which another
    caller might truncate from 3.7), a string or a bool is refused, naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _words(sentence: Mapping) -> list[str]:
    tokens = sentence.get("tokens") or []
    return list(tokens) if tokens else re.findall(r"[a-z]+", str(sentence.get("sent", "")).lower())


def _rng(seed: int, epoch: int, ref_id: int, sent_id: int | None) -> np.random.Generator:
    key = [seed, epoch, ref_id & 0xFFFFFFFFFFFFFFFF]
    if sent_id is not None:
        key.append(sent_id & 0xFFFFFFFFFFFFFFFF)
    return np.random.default_rng(key)


def draw_sentence(row: Mapping, seed: int, epoch: int, sentence_key: str) -> tuple[np.random.Generator, int | None, str, int]:
    """(the sample's generator, index into ``sentences``, text, sent_id): a sentence drawn for the ref, or an
    exploded row's own (its generator seeded by its sent_id too)."""
    ref_id = int(row["ref_id"])
    sentences = row.get("sentences") or []
    if "sent_id" in row and "sentence" in row:  # a row of explode_sentences: its sentence, its own draws
        sent_id = int(row["sent_id"])
        ids = [int(s["sent_id"]) for s in sentences]
        rng = _rng(seed, epoch, ref_id, sent_id)
        return rng, ids.index(sent_id) if sent_id in ids else None, row["sentence"], sent_id
    if not sentences:
        raise ValueError(f"ref {ref_id} has no sentences")
    rng = _rng(seed, epoch, ref_id, None)
    index = int(rng.integers(len(sentences)))
    return rng, index, sentences[index][sentence_key], int(sentences[index]["sent_id"])


def draw_mode(rng: np.random.Generator, p: Mapping[str, float]) -> str:
    """A mode with probabilities ``p``; one uniform draw (``rng.choice(p=...)`` costs 20 us a sample)."""
    u = rng.random()
    for mode in MODES:
        u -= p[mode]
        if u < 0:
            return mode
    return [mode for mode in MODES if p[mode] > 0][-1]  # u within rounding of 1


def draw_grid(rng: np.random.Generator, grid: int | str) -> int:
    """Tiles per side of one mosaic: ``grid`` itself, or for ``"mix"`` 2 or 3 with probability 1/2 each, as
    the official ``mix_grid`` (snuviplab/NeMo dataloader.py:314-315, 329-330). Draws nothing for a fixed grid,
    so fixed-grid samples are those of earlier versions."""
    if grid != "mix":
        return grid
    return 2 if rng.random() < 0.5 else 3


def draw_cell(rng: np.random.Generator, sentence: Mapping | None, grid: int) -> int:
    """The target's cell, uniform over those the sentence's spatial words allow (every cell for None)."""
    cells = spatial_quadrants(_words(sentence) if sentence is not None else [], grid)
    return cells[int(rng.integers(len(cells)))]


def _shuffled(rng: np.random.Generator, pool: Sequence[int]) -> Iterator[int]:
    """Pool items in random order without replacement; lazy, so a 20k-image pool costs a few draws."""
    n = len(pool)
    if n <= 64:
        for i in rng.permutation(n):
            yield pool[i]
        return
    seen: set[int] = set()
    while len(seen) < n:
        i = int(rng.integers(n))
        if i not in seen:
            seen.add(i)
            yield pool[i]


# paint(image_id, cell): the image painted into the cell and its placement, or None (noted) when unusable
Paint = Callable[[int, tuple[int, int, int, int]], "Placement | None"]


def _fill(rng, candidates: Sequence[int], cells, target_id: int, paint: Paint, notes) -> list[tuple[int, Placement]] | None:
    """Paint ``cells`` with candidates (never the target's image) drawn without replacement; None if
    not one is usable. A bad candidate is replaced by the next; with too few usable ones, they repeat.
    Returns (image id, placement) per cell.
    """
    order = _shuffled(rng, candidates)
    painted: list[tuple[int, Placement]] = []
    for cell in cells:
        for image_id in order:
            placement = paint(image_id, cell) if image_id != target_id else None
            if placement is not None:
                painted.append((image_id, placement))
                break
        else:
            break
    if not painted:
        return None
    if len(painted) < len(cells):
        notes.append(f"only {len(painted)} usable negatives: repeated")
        usable = [image_id for image_id, _ in painted]
        for cell in cells[len(painted) :]:
            image_id = usable[int(rng.integers(len(usable)))]
            painted.append((image_id, paint(image_id, cell)))
    return painted


def draw_negatives(
    rng: np.random.Generator, mode: str, row: Mapping, index: int | None, sent_id: int,
    pool: Callable[[], Sequence[int]], cells, paint: Paint, notes: list[str],
) -> tuple[str, list[tuple[int, Placement]] | None]:  # fmt: skip
    """(the mode shown, (image id, placement) per cell) for a ``random`` or ``retrieval`` mosaic.

    Retrieval draws from the sentence's mined ``negatives``, random from ``pool()`` (read only when
    needed); retrieval with no usable mined negative falls back to random, random with none to single
    (negatives None).
    """
    target_id = int(row["image_id"])
    negatives = None
    if mode == "retrieval":
        mined = row.get("negatives") or []
        has_list = index is not None and index < len(mined)
        candidates = list(dict.fromkeys(int(i) for i in mined[index])) if has_list else []
        if candidates:
            negatives = _fill(rng, candidates, cells, target_id, paint, notes)
        if negatives is None:
            notes.append(f"no usable mined negatives for sentence {sent_id}: random mode")
            mode = "random"
    if mode == "random":
        negatives = _fill(rng, pool(), cells, target_id, paint, notes)
        if negatives is None:
            notes.append("random pool empty or unreadable: single")
            return "single", None
    return mode, negatives
