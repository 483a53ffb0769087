"""COCO masks as pycocotools' RLE: encode, decode, check and sample, the one place nemo_hf handles them.

Every number in a segmentation or an RLE from a file is checked here before pycocotools (C code) sees it;
a bad one is a :class:`MaskFormatError` whose message starts with the ``where`` the caller passes (the file,
ref, annotation or prediction). `rle_runs` and `rle_sample` read compressed RLEs without decoding them.
Conventions: ``{"size": [h, w], "counts": str}`` (compressed, column-major), masks uint8 (h, w) of 0/1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MAX_SIDE = 32768  # per image side: more than any photo dataset holds, little enough for pycocotools


class MaskFormatError(ValueError):
    """A segmentation or RLE that cannot be a mask of its image: the message names where it came from."""


def is_int(value) -> bool:
    """An integer (numpy's too), never a bool: a size or id is never truncated from a float."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_image_size(height, width, where: str) -> tuple[int, int]:
    """(height, width) as ints in 1..MAX_SIDE, else an error naming ``where`` (pycocotools hangs on 0)."""
    for name, value in (("width", width), ("height", height)):
        if not is_int(value) or not 1 <= value <= MAX_SIDE:
            raise MaskFormatError(f"{where}: {name} {value!r} is not an integer in 1..{MAX_SIDE}")
    return int(height), int(width)


def _polygons(segmentation: list, height: int, width: int, where: str) -> list[list[float]]:
    """Polygons as float lists, each of at least 3 points, every coordinate finite and within one image
    size of the image (pycocotools rasterises every edge point by point: a far coordinate crashes it)."""
    if not segmentation:
        raise MaskFormatError(f"{where}: empty segmentation")
    parts = []
    for part in segmentation:
        try:
            coords = np.asarray(part) if isinstance(part, (list, tuple)) else None
        except (ValueError, TypeError):  # ragged nesting
            coords = None
        if coords is None or coords.ndim != 1 or (coords.size and coords.dtype.kind not in "iuf"):
            raise MaskFormatError(f"{where}: polygon {str(part)[:80]} is not a list of numbers")
        if len(part) < 6 or len(part) % 2:
            raise MaskFormatError(
                f"{where}: polygon with {len(part) / 2:g} points; a polygon needs at least 3 (x, y) pairs"
            )
        coords = coords.astype(np.float64)
        points = coords.reshape(-1, 2)
        (x0, y0), (x1, y1) = points.min(axis=0).tolist(), points.max(axis=0).tolist()  # NaN, inf propagate
        if not all(map(np.isfinite, (x0, y0, x1, y1))):
            raise MaskFormatError(f"{where}: polygon has a coordinate that is not finite")
        if x0 < -width or x1 > 2 * width or y0 < -height or y1 > 2 * height:
            raise MaskFormatError(
                f"{where}: polygon reaches ({x1:g}, {y1:g}) / ({x0:g}, {y0:g}), far outside the {width}x{height} image"
            )
        parts.append(coords.tolist())
    return parts


def check_rle(rle, height: int, width: int, where: str) -> dict:
    """A COCO RLE (uncompressed counts list or compressed string) checked for pycocotools: ``size`` equal
    to the image's [h, w], counts that parse, are not negative and sum to h*w. Returns it compressed."""
    size, counts = (rle.get("size"), rle.get("counts")) if isinstance(rle, dict) else (None, None)
    if not isinstance(size, (list, tuple)) or [v if is_int(v) else None for v in size] != [height, width]:
        raise MaskFormatError(f"{where}: RLE size {size!r} is not the image's [h, w] = [{height}, {width}]")
    if isinstance(counts, (list, tuple)):
        if not all(is_int(c) and 0 <= c <= height * width for c in counts):
            raise MaskFormatError(f"{where}: RLE counts must be integers in 0..h*w")
        runs = np.asarray(counts, dtype=np.int64)
        compressed = None
    elif isinstance(counts, (str, bytes)):
        try:
            compressed = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            runs = rle_runs(compressed)
        except ValueError as err:  # UnicodeEncodeError included
            raise MaskFormatError(f"{where}: malformed compressed RLE counts ({err})") from None
        if (runs < 0).any():
            raise MaskFormatError(f"{where}: malformed compressed RLE counts (a negative run)")
    else:
        raise MaskFormatError(f"{where}: RLE counts must be a list of integers or a compressed string, got {type(counts).__name__}")
    if int(runs.sum()) != height * width:
        raise MaskFormatError(f"{where}: RLE counts sum to {int(runs.sum())}, the image has h*w = {height * width} pixels")
    if compressed is None:
        return mask_utils.frPyObjects({"size": [height, width], "counts": [int(c) for c in runs]}, height, width)
    return {"size": [height, width], "counts": compressed}


def rle_problem(rle: Mapping) -> str | None:
    """Why a compressed RLE (a prediction's, already of its image's size) cannot be a mask of that size
    (pycocotools would read past it), or None: `check_rle`'s question, answered as a reason."""
    counts = rle["counts"]
    h, w = rle["size"]
    if len(counts) > 6 * (h * w + 1):  # at most h*w+1 runs of at most 6 characters: bounded before decoding
        return f"counts holds {len(counts)} characters, more than a {h}x{w} mask can need"
    raw = counts.encode("ascii") if counts.isascii() else b"\x00"
    if raw and (min(raw) < 48 or max(raw) > 111):  # each character carries 5 bits + a continuation bit, offset 48
        return "counts is not a COCO RLE string"
    try:
        runs = rle_runs(raw)
    except ValueError as err:
        return str(err)
    if (runs < 0).any() or int(runs.sum()) != h * w:
        return f"counts cover {int(runs.sum())} pixels, not h*w = {h * w}"
    return None


def segmentation_to_rle(segmentation, height: int, width: int, where: str, *, allow_empty: bool = False) -> dict:
    """The binarized union of an annotation's polygons (or its RLE) as compressed COCO RLE.

    The refer toolkit sums the decoded polygon masks, so overlapping parts exceed 1; the union
    (``merge``) is that sum binarized, computed without decoding to pixels. Every number is checked
    before pycocotools sees it, and an empty mask is an error unless ``allow_empty``: ``where`` names the
    annotation (and ref).
    """
    height, width = check_image_size(height, width, where)
    if isinstance(segmentation, dict):  # iscrowd-style RLE; RefCOCO itself has none
        rles = [check_rle(segmentation, height, width, where)]
    elif isinstance(segmentation, (list, tuple)):
        # (frPyObjects would read a 4-number list as a box: _polygons keeps that out.)
        rles = mask_utils.frPyObjects(_polygons(segmentation, height, width, where), height, width)
    else:
        raise MaskFormatError(f"{where}: segmentation is a {type(segmentation).__name__}; expected polygons or an RLE")
    rle = mask_utils.merge(rles, intersect=False)
    if not allow_empty and mask_utils.area(rle) == 0:
        raise MaskFormatError(f"{where}: the mask is empty (the segmentation lies outside the {width}x{height} image or has no area)")
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def encode_rle(mask: np.ndarray) -> dict:
    """A (h, w) mask (non-zero = object) as a row's ``mask`` column: compressed COCO RLE with ``counts`` a str."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) != 0, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """uint8 (h, w) mask of 0/1 from a row's ``mask`` column (``counts`` as str or bytes)."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [int(v) for v in rle["size"]], "counts": counts})


def decode_mask(row_or_rle) -> np.ndarray:
    """uint8 (h, w) 0/1 mask of a refs row (its ``mask`` column) or of a COCO RLE ``{"size", "counts"}``:
    the refer toolkit's ``getMask`` for this dataset."""
    rle = row_or_rle.get("mask", row_or_rle) if isinstance(row_or_rle, Mapping) else None
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise TypeError(
            f"decode_mask wants a refs row (with a 'mask' column) or an RLE dict with 'size' and 'counts', "
            f"got {type(row_or_rle).__name__}"
        )
    return decode_rle(rle)


def rle_runs(counts: str | bytes | Sequence[int]) -> np.ndarray:
    """Run lengths of a COCO RLE (column-major, starting with a run of zeros), compressed string or plain list.

    Vectorised port of pycocotools' ``rleFrString``: 5-bit groups offset by 48, bit 0x20 continues a
    number, bit 0x10 of its last group is the sign, and from the fourth number on each is stored as
    the difference to the number two places before.
    """
    if not isinstance(counts, (str, bytes)):
        return np.asarray(counts, dtype=np.int64)
    raw = counts.encode("ascii") if isinstance(counts, str) else counts
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() > 63:
        raise ValueError("RLE counts string has a character outside '0'..'o'")
    ends = np.flatnonzero((chars & 0x20) == 0)
    if ends.size == 0 or ends[-1] != chars.size - 1:
        raise ValueError("truncated RLE counts string")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 6:  # pycocotools shifts 5-bit groups in a 32-bit int: a 7th group is garbled there
        raise ValueError("RLE counts string holds a number of more than 6 characters (pycocotools misreads it)")
    shift = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    values = np.where((chars[ends] & 0x10) != 0, values - (1 << (5 * lengths)), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.max() >= 1 << 32:  # pycocotools keeps runs as uint32: a longer one is truncated there
        raise ValueError("RLE counts string holds a run of 2^32 pixels or more")
    return runs


def rle_sample(rle: dict, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``decode(rle)[np.ix_(rows, cols)]`` without decoding the full-size mask.

    ``rows`` and ``cols`` must be non-decreasing (nearest-neighbour indices are). Each run boundary is
    located among the sampled pixels (in column-major order), then the runs are expanded at the
    sampled resolution only. The result may be a transposed (column-major) view.
    """
    h, w = (int(v) for v in rle["size"])
    runs = rle_runs(rle["counts"])
    bounds = np.cumsum(runs)
    if bounds.size == 0 or bounds[-1] != h * w:
        raise ValueError(f"RLE counts sum to {int(bounds[-1]) if bounds.size else 0}, expected h*w = {h * w}")
    rows = np.asarray(rows, dtype=np.intp)
    cols = np.asarray(cols, dtype=np.intp)
    upsampled = cols.size > 1 and not bool((cols[1:] > cols[:-1]).all())
    unique_cols, expand = np.unique(cols, return_inverse=True) if upsampled else (cols, None)
    col_of, row_of = np.divmod(bounds, h)
    cols_before = np.searchsorted(unique_cols, col_of, side="left")
    sampled_col = unique_cols[np.minimum(cols_before, unique_cols.size - 1)] == col_of
    rows_before = np.where(sampled_col, np.searchsorted(rows, row_of, side="left"), 0)
    points_before = cols_before * rows.size + rows_before
    run_lengths = np.diff(points_before, prepend=0)
    values = (np.arange(runs.size) & 1).astype(np.uint8)
    flat = np.repeat(values, run_lengths)
    sampled = flat.reshape(unique_cols.size, rows.size).T
    return sampled[:, expand] if upsampled else sampled
