"""Florence-2's referring-segmentation target: a mask <-> polygons written as location tokens.

Florence-2 (``transformers``' ``Florence2ForConditionalGeneration``) answers
``<REFERRING_EXPRESSION_SEGMENTATION>`` with text: each polygon a run of ``<loc_x><loc_y>`` pairs, 1000 bins
per axis over the image's width and height, polygons separated by ``<sep>``. :func:`mask_to_target` writes a
mask that way; :func:`target_to_mask` reads generated (or written) text back through the processor's own
parser, so training targets, the round trip and evaluation share one path.

- Polygons: the outer boundary of each 8-connected component, traced along pixel edges (the exact outline of
  the pixels, COCO's coordinate convention: pixel j spans [j, j + 1)). Holes cannot be written (a polygon
  target has no way to say "minus this"): the raster of a target fills them.
- Quantization: the processor's quantizer, ``floor(x / (W / 1000))`` clamped to 0..999 (y over H).
- Order: largest polygon first (a generation cut short keeps the most area); each starts at its top-most,
  then left-most vertex and runs clockwise on screen.
- Simplification only where the target would pass ``max_tokens`` (1024: BART's decoder positions, counting
  ``<s>`` and ``</s>``): vertices are removed one by one, smallest triangle first (Visvalingam-Whyatt, across
  all polygons), a polygon already down to a triangle being dropped whole when it is the cheapest.
- Reading back: the processor's parser (``post_process_generation``) finds the polygons; it is asked for
  bins (``image_size=(1000, 1000)``, where its dequantizer ``int((q + 0.5) * size / 1000)`` returns ``q``), which
  are then dequantized as the processor does, ``(q + 0.5) * W / 1000``, but without its final ``int()``: that
  truncation moves every vertex up to a pixel toward the top-left. With fewer than 1000 pixels a side (COCO's
  images, Florence-2's 768 px squares) a bin centre lies within 0.5 px of the pixel edge it was quantized
  from, so pycocotools' raster of the read polygon gives the traced pixels back exactly: the round trip loses
  only holes and simplification. From 1000 px a side a bin spans a pixel or more and edges move by up to half
  a bin.
"""

from __future__ import annotations

import heapq
import re
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

from ..masks import decode_rle, segmentation_to_rle

TASK = "<REFERRING_EXPRESSION_SEGMENTATION>"
BINS = 1000
MAX_TARGET_TOKENS = 1024  # Florence-2's BART decoder positions; a target's <s> and </s> count
MAX_TEXT_CHARS = 16 * MAX_TARGET_TOKENS  # a full target is <= ~12k characters; longer text is not a target
SEPARATOR = "<sep>"
_SPECIALS = re.compile(r"</?s>|<pad>")
_TARGET_TEXT = re.compile(r"(?:<loc_\d+>|<sep>)*")
_LOC = re.compile(r"<loc_(\d+)>")
# Directions, clockwise on screen (y down): east, south, west, north (bits 0..3); a left turn is (d + 3) % 4.


class Florence2TargetWarning(UserWarning):
    """Generated text that is not a polygon target: read as an empty mask."""


def check_florence2_processor(processor) -> None:
    """Refuse a processor that cannot write or read Florence-2's polygon text, naming what is expected."""
    tokenizer = getattr(processor, "tokenizer", None)
    types = getattr(processor, "tasks_answer_post_processing_type", None)
    tokens = ("<loc_0>", f"<loc_{BINS - 1}>", SEPARATOR)
    ids = tokenizer.convert_tokens_to_ids(list(tokens)) if hasattr(tokenizer, "convert_tokens_to_ids") else []
    if (
        not hasattr(processor, "post_process_generation")
        or not isinstance(types, dict) or types.get(TASK) != "polygons"
        or len(ids) != len(tokens) or None in ids or getattr(tokenizer, "unk_token_id", None) in ids
    ):  # fmt: skip
        raise TypeError(
            f"expected Florence-2's processor (transformers Florence2Processor, whose tokenizer has <loc_0>..<loc_999> "
            f"and <sep> and whose post_process_generation parses {TASK} polygons, e.g. "
            f"AutoProcessor.from_pretrained('florence-community/Florence-2-base')), got {type(processor).__name__}"
        )


def outer_polygons(mask) -> list[np.ndarray]:
    """(n, 2) int arrays of (x, y) pixel-corner coordinates: the outer boundary of each 8-connected component,
    clockwise on screen, corners only (no collinear vertex). Holes are not returned."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-d (h, w), got shape {m.shape}")
    m = m != 0
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return []
    (top, left), m = (int(rows[0]), int(cols[0])), m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # its box
    height, width = m.shape
    padded = np.zeros((height + 2, width + 2), dtype=bool)
    padded[1:-1, 1:-1] = m
    tl, tr, bl, br = padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]  # pixels around each corner
    # The boundary edges leaving each corner with the object on their right: bit d for direction d.
    codes = (
        (br & ~tr).astype(np.uint8) | ((bl & ~br).astype(np.uint8) << 1)
        | ((tl & ~bl).astype(np.uint8) << 2) | ((tr & ~tl).astype(np.uint8) << 3)
    )  # fmt: skip
    # Vertices are the corners where the boundary turns: one or three of the four pixels set, or a saddle (two
    # diagonal ones). From a vertex, the next one along a row is the next vertex in row-major order (every
    # corner in between lies on the same straight edge), along a column the next in column-major order.
    count = tl.astype(np.uint8) + tr + bl + br
    saddle = (tl & br & ~tr & ~bl) | (tr & bl & ~tl & ~br)
    turns = (count == 1) | (count == 3) | saddle
    row = width + 1
    by_row = np.flatnonzero(turns)
    by_col = by_row[np.lexsort((by_row // row, by_row % row))]
    ahead = (
        dict(zip(by_row[:-1].tolist(), by_row[1:].tolist())), dict(zip(by_col[:-1].tolist(), by_col[1:].tolist())),
        dict(zip(by_row[1:].tolist(), by_row[:-1].tolist())), dict(zip(by_col[1:].tolist(), by_col[:-1].tolist())),
    )  # east, south, west, north
    remaining = dict(zip(by_row.tolist(), codes.ravel()[by_row].tolist()))
    polygons = []
    for start in by_row[~saddle.ravel()[by_row]].tolist():  # a saddle (two edges out) is never a start
        if start not in remaining:
            continue
        vertices, corner, heading = [], start, None
        while True:
            code = remaining[corner]
            if code & (code - 1):  # a saddle: turn left, so diagonal neighbours stay one component
                direction = (heading + 3) % 4
                remaining[corner] = code & ~(1 << direction)
            else:
                direction = code.bit_length() - 1
                del remaining[corner]
            vertices.append(corner)
            heading = direction
            corner = ahead[direction][corner]
            if corner == start:
                break
        points = np.array([(v % row + left, v // row + top) for v in vertices], dtype=np.int64)
        if _twice_area(points) > 0:  # clockwise on screen: an outer boundary (holes run the other way)
            polygons.append(points)
    return polygons


def _twice_area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def quantize(points: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(n, 2) (x, y) -> bins, as the processor's quantizer: ``floor(x / (W / 1000))`` clamped to 0..999 (y over H).
    ``size`` is (height, width), a mask's shape."""
    height, width = size
    per_bin = np.array([width / BINS, height / BINS])
    return np.clip(np.floor(np.asarray(points, dtype=np.float64) / per_bin), 0, BINS - 1).astype(np.int64)


def target_length(polygons: Sequence[np.ndarray]) -> int:
    """Tokens of the target text with ``<s>`` and ``</s>``: two per vertex, one ``<sep>`` between polygons."""
    return 2 + sum(2 * len(p) for p in polygons) + max(len(polygons) - 1, 0)


def mask_polygons(mask, max_tokens: int = MAX_TARGET_TOKENS) -> list[np.ndarray]:
    """The quantized polygons :func:`mask_to_target` writes: (n, 2) bins each, largest first, at most
    ``max_tokens`` tokens in all."""
    m = np.asarray(mask)
    polygons = []
    for points in outer_polygons(m):
        bins = quantize(points, m.shape)
        bins = bins[np.any(bins != np.roll(bins, 1, axis=0), axis=1)]  # repeated bins add nothing
        if len(bins) >= 3:
            first = np.lexsort((bins[:, 0], bins[:, 1]))[0]  # top-most, then left-most
            polygons.append((_twice_area(points), np.roll(bins, -first, axis=0)))
    polygons = [bins for _, bins in sorted(polygons, key=lambda p: -p[0])]
    if target_length(polygons) > max_tokens:
        polygons = simplify(polygons, max_tokens, m.shape)
    return polygons


def mask_to_target(mask, max_tokens: int = MAX_TARGET_TOKENS) -> str:
    """A (H, W) mask at the image's own size (non-zero = object) -> Florence-2's target text,
    ``<loc_x><loc_y>...<sep><loc_x>...``; an empty mask gives ``""``. See the module docstring."""
    if max_tokens < 9:
        raise ValueError(f"max_tokens must leave room for one triangle (9 tokens with <s> and </s>), got {max_tokens}")
    return SEPARATOR.join(
        "".join(f"<loc_{x}><loc_{y}>" for x, y in bins.tolist()) for bins in mask_polygons(mask, max_tokens)
    )


def simplify(polygons: list[np.ndarray], max_tokens: int, size: Sequence[int]) -> list[np.ndarray]:
    """Remove the vertex whose triangle with its neighbours is smallest (in pixels), across all polygons, until
    the target fits ``max_tokens``; a triangle whose own area is the smallest cost goes whole (7 tokens)."""
    height, width = size
    scale = np.array([width / BINS, height / BINS])
    points = [(p * scale).tolist() for p in polygons]
    nxt = [list(range(1, len(p))) + [0] for p in polygons]
    prv = [[len(p) - 1] + list(range(len(p) - 1)) for p in polygons]
    alive = [len(p) for p in polygons]
    version = [[0] * len(p) for p in polygons]
    heap: list = []

    def cost(k: int, i: int) -> float:
        if alive[k] == 3:
            return abs(_twice_area(np.array([points[k][j] for j in (prv[k][i], i, nxt[k][i])]))) / 2
        (ax, ay), (bx, by), (cx, cy) = points[k][prv[k][i]], points[k][i], points[k][nxt[k][i]]
        return abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2

    def push(k: int, i: int) -> None:
        version[k][i] += 1
        heapq.heappush(heap, (cost(k, i), k, i, version[k][i]))

    for k, p in enumerate(polygons):
        for i in range(len(p)):
            push(k, i)
    vertices, count = sum(alive), len(polygons)
    while 2 + 2 * vertices + max(count - 1, 0) > max_tokens and heap:
        _, k, i, v = heapq.heappop(heap)
        if alive[k] == 0 or version[k][i] != v:
            continue
        if alive[k] == 3:  # the polygon goes whole
            alive[k], vertices, count = 0, vertices - 3, count - 1
            continue
        a, b = prv[k][i], nxt[k][i]
        nxt[k][a], prv[k][b] = b, a
        version[k][i] = -1
        alive[k], vertices = alive[k] - 1, vertices - 1
        for j in (a, b):
            push(k, j)
        if alive[k] == 3:
            for j in (a, b, nxt[k][b]):
                push(k, j)
    out = []
    for k, p in enumerate(polygons):
        if alive[k]:
            keep = [i for i in range(len(p)) if version[k][i] >= 0]
            out.append(p[keep])
    return out


def parse_target(text: str, size: Sequence[int], processor) -> tuple[list[list[float]], str | None]:
    """Target text -> (polygons as flat [x0, y0, x1, y1, ...] lists in pixels, problem or None).

    Text that is not a polygon target (words or other tokens, no location token, an odd count, a bin past
    999, over ``MAX_TEXT_CHARS``) gives no polygons and says why; ``""`` (after ``<s>``, ``</s>``, ``<pad>``)
    is a valid empty target. Valid text goes through ``processor.post_process_generation``."""
    if not isinstance(text, str):
        return [], f"not text ({type(text).__name__})"
    if len(text) > MAX_TEXT_CHARS:
        return [], f"{len(text)} characters, longer than any target ({MAX_TEXT_CHARS})"
    body = _SPECIALS.sub("", text).strip()
    if not body:
        return [], None
    if not _TARGET_TEXT.fullmatch(body):
        return [], "not <loc_x><loc_y> pairs and <sep> only"
    parts = body.split(SEPARATOR)
    counts = [len(_LOC.findall(part)) for part in parts]
    if not any(counts):
        return [], "no location token"
    if any(c % 2 for c in counts):
        return [], "a polygon with an odd number of location tokens"
    if any(int(q) >= BINS for q in _LOC.findall(body)):
        return [], f"a location bin past {BINS - 1}"
    check_florence2_processor(processor)
    height, width = size
    parsed = processor.post_process_generation(body, task=TASK, image_size=(BINS, BINS))[TASK]  # bins as they are
    per_bin = (width / BINS, height / BINS)
    polygons = [
        [(q + 0.5) * per_bin[i % 2] for i, q in enumerate(polygon)]
        for instance in parsed["polygons"]
        for polygon in instance
    ]
    return polygons, None


def polygons_to_mask(polygons: Sequence[Sequence[float]], size: Sequence[int]) -> np.ndarray:
    """uint8 (H, W) raster of the union of flat polygons in pixel coordinates (pycocotools, COCO's convention);
    polygons of fewer than 3 points have no area and are skipped."""
    height, width = (int(v) for v in size)
    polygons = [list(p) for p in polygons if len(p) >= 6]
    if not polygons:
        return np.zeros((height, width), dtype=np.uint8)
    return decode_rle(segmentation_to_rle(polygons, height, width, "Florence-2 target", allow_empty=True))


def target_to_polygons(text: str, size: Sequence[int], processor, problems: Counter | None = None) -> list[list[float]]:
    """:func:`parse_target`'s polygons; text that does not parse gives none and a :class:`Florence2TargetWarning`,
    or, with ``problems`` (a ``Counter``), one count under its reason instead (evaluation reports the counts once)."""
    polygons, problem = parse_target(text, size, processor)
    if problem is not None:
        if problems is None:
            warnings.warn(f"Florence-2 text read as an empty mask: {problem}", Florence2TargetWarning, stacklevel=3)
        else:
            problems[problem] += 1
    return polygons


def target_to_mask(text: str, size: Sequence[int], processor, problems: Counter | None = None) -> np.ndarray:
    """Target (or generated) text -> uint8 (H, W) mask at ``size`` (height, width), the size the text describes;
    text that does not parse is an empty mask, warned or counted as :func:`target_to_polygons` says."""
    return polygons_to_mask(target_to_polygons(text, size, processor, problems), size)


def round_trip(mask, processor, max_tokens: int = MAX_TARGET_TOKENS) -> tuple[float, int]:
    """(IoU of the mask with its target read back, the target's tokens with <s> and </s>): what a perfect
    model would score on this mask. Two empty masks agree (IoU 1)."""
    m = np.asarray(mask) != 0
    text = mask_to_target(m, max_tokens)
    back = target_to_mask(text, m.shape, processor).astype(bool)
    union = int(np.count_nonzero(m | back))
    iou = int(np.count_nonzero(m & back)) / union if union else 1.0
    return iou, 2 + text.count("<loc_") + text.count(SEPARATOR)
