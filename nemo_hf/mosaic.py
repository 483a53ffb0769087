"""NeMo mosaics rendered lazily per sample, and the matching evaluation transform.

`NeMoMosaic` is meant for ``Dataset.set_transform`` / ``with_transform`` (or ``IterableDataset.map(...,
batched=True)``): every call draws a sentence, a mode, a quadrant and the negatives afresh from a seed
derived from (seed, epoch, ref_id), so a sample is the same whatever the DataLoader workers and
changes every epoch. `EvalTransform` renders evaluation rows (one sentence each, see
`explode_sentences`) with the same output columns plus what is needed to map a prediction back.

Speed: a tile is a quarter of the output, so JPEGs are decoded at the smallest DCT scale whose result
still covers the tile (libjpeg-turbo scaling through simplejpeg) and then resized straight into a numpy
canvas (`geometry.resize_pixels`); the target mask is sampled from its RLE at tile resolution
(`geometry.rle_sample`), never decoded at full size. PIL comes in only for non-JPEG sources and for
the output image when arrays are not asked for.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image

from . import schema
from .geometry import RESAMPLE_MODES, TILE_MODES, Placement, grid_cells, mask_box, prediction_to_original

MODES = ("single", "random", "retrieval")
OUTPUT_COLUMNS = (
    "image", "mask", "bbox", "sentence", "sent_id", "ref_id",
    "target_quadrant", "tile_image_ids", "mode", "notes",
)  # fmt: skip
EVAL_COLUMNS = OUTPUT_COLUMNS + ("orig_size", "content_box", "orig_mask")

# Whole words that pin the target to a side of the grid (tiles row-major: 0 TL, 1 TR, 2 BL, 3 BR).
SPATIAL_WORDS = {
    "left": {0, 2},
    "right": {1, 3},
    **{w: {0, 1} for w in ("top", "high", "above")},
    **{w: {2, 3} for w in ("bottom", "low", "below", "under", "beneath")},
}
# Mean ImageNet colour: letterbox padding becomes ~0 after the usual normalisation.
DEFAULT_FILL = (124, 116, 104)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_JPEG_COLORSPACES = ("Gray", "YCbCr", "RGB")  # what libjpeg-turbo converts to RGB itself; CMYK/YCCK go through PIL


def spatial_quadrants(words: Sequence[str]) -> list[int]:
    """Quadrants the target may take given an expression's words; contradictory or none: all four."""
    allowed = {0, 1, 2, 3}
    for word in words:
        allowed &= SPATIAL_WORDS.get(word.lower(), allowed)
    return sorted(allowed) or [0, 1, 2, 3]


def _words(sentence: Mapping) -> list[str]:
    tokens = sentence.get("tokens") or []
    return list(tokens) if tokens else re.findall(r"[a-z]+", str(sentence.get("sent", "")).lower())


class EncodedImage:
    """An encoded image: its stored size read from the header, decoded on demand at a reduced scale.

    EXIF orientation is never applied: annotations refer to the stored pixel order.
    """

    __slots__ = ("data", "size", "_pil")

    def __init__(self, data: bytes):
        self.data = data
        self._pil = None
        header = None
        if data[:2] == b"\xff\xd8":
            try:
                header = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                header = None
        if header is not None and header[2] in _JPEG_COLORSPACES:
            self.size = (header[1], header[0])
        else:
            self._pil = Image.open(io.BytesIO(data))
            self.size = self._pil.size

    def decode(self, min_size: tuple[int, int], layout: str = "RGB") -> np.ndarray:
        """Pixels (uint8 HxWx3 for ``RGB``, HxWx4 for ``RGBX``) at the smallest JPEG DCT scale whose result is
        at least ``min_size`` (w, h)."""
        if self._pil is None:
            try:
                return simplejpeg.decode_jpeg(
                    self.data, colorspace=layout, min_width=min_size[0], min_height=min_size[1], strict=True
                )
            except ValueError:
                # A libjpeg warning (say, extraneous bytes before a marker) or real damage: PIL tolerates
                # the first and raises on the second, like any full decoder.
                self._pil = Image.open(io.BytesIO(self.data))
        image = self._pil
        if image.format == "JPEG":
            image.draft("RGB", min_size)
        return np.array(image.convert(layout))


class _BinaryCells:
    """One chunk of an Image column: a cell's bytes as a view of the (memory-mapped) Arrow buffer, or its file."""

    def __init__(self, chunk):
        encoded = chunk.field("bytes")
        _, offsets, data = encoded.buffers()
        width = np.int64 if encoded.type == pa.large_binary() else np.int32
        self.offsets = np.frombuffer(offsets, width)[encoded.offset : encoded.offset + len(encoded) + 1]
        self.missing = encoded.is_null().to_numpy(zero_copy_only=False)
        self.data = memoryview(b"" if data is None else data).cast("B")  # Arrow exports signed chars
        self.paths = chunk.field("path")

    def get(self, i: int) -> bytes | memoryview | None:
        if self.missing[i]:
            path = self.paths[i].as_py()
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()
        return self.data[self.offsets[i] : self.offsets[i + 1]]


class ImageTable:
    """image_id -> encoded bytes from the ``images`` config (or a Mapping), indexed lazily once per process.

    Only the index-free source (the Dataset or Mapping) is pickled; each process rebuilds the
    image_id -> row index on first use and then reads a cell's bytes straight from the dataset's
    (memory-mapped) Arrow column, a few microseconds instead of a formatted row's tens.
    """

    def __init__(self, images, pool: Sequence[int] | None = None, config: str | None = None):
        if isinstance(images, datasets.DatasetDict):
            raise TypeError(f"images is a DatasetDict with splits {list(images)}; pass its split, e.g. images['train']")
        if isinstance(images, datasets.IterableDataset):
            raise TypeError("images must allow random access: load the images config as a Dataset, not streaming")
        if not isinstance(images, (datasets.Dataset, Mapping)):
            raise TypeError(
                f"images must be the images config Dataset or a Mapping image_id -> bytes, got {type(images).__name__}"
            )
        if config is not None and config not in schema.REFS_CONFIGS:
            raise ValueError(f"unknown config {config!r}; known: {', '.join(schema.REFS_CONFIGS)}")
        self.images = images
        self.config = config
        self._given_pool = None if pool is None else [int(i) for i in pool]
        self._index: dict[int, tuple[int, int]] | None = None
        self._cells = None
        self._pool: list[int] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_index": None, "_cells": None, "_pool": None}

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        kind = "Mapping" if isinstance(self.images, Mapping) else "Dataset"
        return f"<{kind} of {len(self)} images>"

    def _dataset_index(self) -> dict[int, tuple[int, int]]:
        """image_id -> (chunk, offset) in the Arrow ``image`` column, over the rows the Dataset shows."""
        if self._index is None:
            table = self.images.data.table
            # a select/shuffle/filter view shows some rows of its table, through an indices mapping
            mapping = self.images._indices
            rows = np.arange(len(table)) if mapping is None else mapping.column(0).to_numpy()
            ids = table.column("image_id").to_numpy()[rows]
            column = table.column("image")
            starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
            chunk = np.searchsorted(starts, rows, side="right") - 1
            offset = rows - starts[chunk]
            self._index = {int(i): (int(c), int(o)) for i, c, o in zip(ids, chunk, offset)}
            self._cells = [_BinaryCells(chunk) for chunk in column.chunks]
        return self._index

    def bytes_of(self, image_id: int) -> bytes | memoryview | None:
        """Encoded bytes (from a Dataset, a view of its Arrow buffer), or None when the id is not in the table."""
        if isinstance(self.images, Mapping):
            data = self.images.get(int(image_id))
            return data["bytes"] if isinstance(data, Mapping) else data
        place = self._dataset_index().get(int(image_id))
        if place is None:
            return None
        return self._cells[place[0]].get(place[1])

    def pool(self) -> list[int]:
        """The random-mode pool: images whose ``negative_pool_of`` names the config (never val/test images)."""
        if self._given_pool is not None or isinstance(self.images, Mapping):
            return self._given_pool or []
        if self._pool is None:
            table = self.images.select_columns(["image_id", "negative_pool_of"]).with_format("arrow")[:]
            ids = table["image_id"].to_pylist()
            pools = table["negative_pool_of"].to_pylist()
            config = self.config
            if config is None:
                names = sorted({name for names in pools for name in names or ()})
                if len(names) > 1:
                    listed = ", ".join(names)
                    raise ValueError(f"the images serve as negatives for several configs ({listed}); pass config=")
                config = names[0] if names else None
            self._pool = [int(i) for i, names in zip(ids, pools) if config in (names or ())]
        return self._pool

    def open(self, image_id: int) -> EncodedImage:
        """The encoded image; KeyError when missing, one of the decode errors when the header is unreadable."""
        data = self.bytes_of(image_id)
        if data is None:
            raise KeyError(image_id)
        return EncodedImage(data)


@dataclass(frozen=True)
class Warmup:
    """Before epoch ``epochs``, a sample is a random mosaic with probability ``p_random`` (else single).

    The official loader's schedule: easy random mosaics first, the mode probabilities ``p`` after.
    """

    epochs: int
    p_random: float = 1.0


def _normalised(p: Mapping[str, float]) -> dict[str, float]:
    unknown = set(p) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)} in p; expected keys among {MODES}")
    if any(v < 0 for v in p.values()) or sum(p.values()) <= 0:
        raise ValueError(f"mode probabilities must be non-negative and not all zero, got {dict(p)}")
    total = sum(p.values())
    return {mode: p.get(mode, 0.0) / total for mode in MODES}


def _draw_mode(rng: np.random.Generator, p: Mapping[str, float]) -> str:
    """A mode with probabilities ``p``; one uniform draw (``rng.choice(p=...)`` costs 20 us a sample)."""
    u = rng.random()
    for mode in MODES:
        u -= p[mode]
        if u < 0:
            return mode
    return [mode for mode in MODES if p[mode] > 0][-1]  # u within rounding of 1


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


class _Renderer:
    """What the training and evaluation transforms share: image lookup, decoding, placing, the output row."""

    def __init__(self, images, output_size, tile, return_arrays, fill, resample, pool=None, config=None):
        if tile not in TILE_MODES:
            raise ValueError(f"unknown tile mode {tile!r}; expected one of {TILE_MODES}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample {resample!r}; expected one of {RESAMPLE_MODES}")
        self.images = images if isinstance(images, ImageTable) else ImageTable(images, pool=pool, config=config)
        self.output_size = int(output_size)
        grid_cells(self.output_size)  # validates the size
        self.tile = tile
        self.return_arrays = return_arrays
        self.fill = tuple(fill)
        self.resample = resample

    @property
    def layout(self) -> str:
        """Arrays are HxWx3. A PIL RGB image stores 4 bytes a pixel, so for PIL output the tiles are decoded,
        resized (torch's native 4-channel kernel) and pasted as RGBX, and PIL takes the canvas as it is."""
        return "RGB" if self.return_arrays else "RGBX"

    def _open_target(self, row: Mapping) -> EncodedImage:
        image_id = int(row["image_id"])
        try:
            return self.images.open(image_id)
        except KeyError:
            raise KeyError(f"ref {row.get('ref_id')}: target image {image_id} is not in the images table") from None
        except _DECODE_ERRORS as err:
            raise ValueError(f"ref {row.get('ref_id')}: target image {image_id} cannot be read: {err}") from err

    def _paint(self, source: EncodedImage, placement: Placement, canvas: np.ndarray) -> None:
        placement.place_image(source.decode((placement.w, placement.h), self.layout), canvas, self.resample)

    def _paint_target(self, row, source, cell, canvas, mask_canvas, notes) -> tuple[Placement, list[float]]:
        """Target pixels and mask into ``cell``; returns the placement and the box of the rendered mask."""
        placement = Placement.fit(source.size, cell, self.tile)
        try:
            self._paint(source, placement, canvas)
        except _DECODE_ERRORS as err:
            message = f"ref {row.get('ref_id')}: target image {row['image_id']} cannot be decoded: {err}"
            raise ValueError(message) from err
        try:
            mask = placement.place_mask(row["mask"], mask_canvas)
        except ValueError as err:
            raise ValueError(f"ref {row.get('ref_id')} (image {row['image_id']}): {err}") from err
        box = mask_box(mask, (placement.x, placement.y))
        if box is None:
            notes.append("target mask is empty")
            box = placement.map_box(row.get("bbox") or (0, 0, 0, 0))
        return placement, box

    def _new_canvas(self) -> tuple[np.ndarray, np.ndarray]:
        size = self.output_size
        canvas = np.empty((size, size, len(self.layout)), dtype=np.uint8)
        canvas[0] = self.fill + (255,) * (len(self.layout) - 3)
        canvas[1:] = canvas[0]  # row copies: broadcasting the colour over every pixel is 40x slower
        return canvas, np.zeros((size, size), dtype=np.uint8)

    def _output(self, canvas, mask, box, sentence, sent_id, row, quadrant, tile_ids, mode, notes) -> dict:
        size = canvas.shape[1::-1]
        image = canvas if self.return_arrays else Image.frombytes("RGB", size, canvas, "raw", self.layout)
        return {
            "image": image,
            "mask": mask,
            "bbox": box,
            "sentence": sentence,
            "sent_id": int(sent_id),
            "ref_id": int(row["ref_id"]),
            "target_quadrant": quadrant,
            "tile_image_ids": [int(i) for i in tile_ids],
            "mode": mode,
            "notes": notes,
        }


def _rows(batch: Mapping[str, list]) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{key: batch[key][i] for key in keys} for i in range(n)]


def _columns(outputs: list[dict], names: Sequence[str]) -> dict[str, list]:
    return {name: [out[name] for out in outputs] for name in names}


class NeMoMosaic(_Renderer):
    """Training transform: a 2x2 mosaic of the target and three negatives, drawn afresh per sample.

    Per sample a mode is drawn with probabilities ``p`` (after the optional ``schedule`` warm-up):
    ``single`` (the target alone, resized to the output), ``random`` (negatives from the config's
    training pool in the images table) or ``retrieval`` (from the sentence's mined ``negatives``,
    sampled without replacement). The target goes to a uniformly random quadrant (constrained by
    left/right/top/bottom words when ``spatial_words``); its mask and box follow it. Rows whose
    split is not train are rendered single, never mosaicked. Odd ``output_size``: the first row and
    column of tiles get ``output_size // 2`` pixels, the second the rest.

    ``images``: the images config Dataset (its ``negative_pool_of`` gives the random pool for
    ``config``), or a Mapping image_id -> encoded bytes with an explicit ``pool``.
    ``p`` defaults to half single, half retrieval: a starting point, not a published value.
    """

    def __init__(
        self,
        images,
        output_size: int = 480,
        p: Mapping[str, float] | None = None,
        schedule: Warmup | None = None,
        tile: str = "squash",
        spatial_words: bool = False,
        seed: int = 0,
        config: str | None = None,
        pool: Sequence[int] | None = None,
        return_arrays: bool = False,
        sentence_key: str = "sent",
        fill: tuple[int, int, int] = DEFAULT_FILL,
        resample: str = "bilinear",
    ):
        super().__init__(images, output_size, tile, return_arrays, fill, resample, pool=pool, config=config)
        self.p = _normalised(p if p is not None else {"single": 0.5, "retrieval": 0.5})
        if schedule is not None and not 0.0 <= schedule.p_random <= 1.0:
            raise ValueError(f"schedule.p_random must be in [0, 1], got {schedule.p_random}")
        self.schedule = schedule
        self.spatial_words = spatial_words
        self.seed = int(seed)
        self.sentence_key = sentence_key
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draws depend on the epoch; see `MosaicEpochCallback` for Trainer and DataLoader workers."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        p = {mode: round(v, 4) for mode, v in self.p.items() if v}
        return (
            f"NeMoMosaic(images={self.images!r}, output_size={self.output_size}, p={p}, schedule={self.schedule}, "
            f"tile={self.tile!r}, spatial_words={self.spatial_words}, seed={self.seed}, epoch={self.epoch}, "
            f"config={self.images.config!r}, return_arrays={self.return_arrays})"
        )

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        return _columns([self.render(row) for row in _rows(batch)], OUTPUT_COLUMNS)

    def mode_probabilities(self) -> dict[str, float]:
        if self.schedule is not None and self.epoch < self.schedule.epochs:
            q = self.schedule.p_random
            return {"single": 1.0 - q, "random": q, "retrieval": 0.0}
        return self.p

    def _rng(self, ref_id: int, sent_id: int | None) -> np.random.Generator:
        key = [self.seed, self.epoch, ref_id & 0xFFFFFFFFFFFFFFFF]
        if sent_id is not None:
            key.append(sent_id & 0xFFFFFFFFFFFFFFFF)
        return np.random.default_rng(key)

    def _pick_sentence(self, row: Mapping) -> tuple[np.random.Generator, int | None, str, int]:
        """(rng, index into ``sentences``, text, sent_id): a sentence drawn for the ref, or an exploded row's own."""
        ref_id = int(row["ref_id"])
        sentences = row.get("sentences") or []
        if "sent_id" in row and "sentence" in row:  # a row of explode_sentences: its sentence, its own draws
            sent_id = int(row["sent_id"])
            ids = [int(s["sent_id"]) for s in sentences]
            return self._rng(ref_id, sent_id), ids.index(sent_id) if sent_id in ids else None, row["sentence"], sent_id
        if not sentences:
            raise ValueError(f"ref {ref_id} has no sentences")
        rng = self._rng(ref_id, None)
        index = int(rng.integers(len(sentences)))
        return rng, index, sentences[index][self.sentence_key], int(sentences[index]["sent_id"])

    def render(self, row: Mapping) -> dict:
        """One output row for one refs row (a dict of its columns)."""
        rng, index, sentence, sent_id = self._pick_sentence(row)
        notes: list[str] = []
        source = self._open_target(row)
        split = row.get("split", schema.TRAIN_SPLIT)
        if split != schema.TRAIN_SPLIT:
            notes.append(f"split {split!r}: never mosaicked")
            mode = "single"
        else:
            mode = _draw_mode(rng, self.mode_probabilities())
        if mode == "single":
            return self._single(row, source, sentence, sent_id, notes)

        words = _words(row["sentences"][index]) if (self.spatial_words and index is not None) else []
        quadrants = spatial_quadrants(words)
        quadrant = quadrants[int(rng.integers(len(quadrants)))]
        cells = grid_cells(self.output_size)
        canvas, mask = self._new_canvas()
        _, box = self._paint_target(row, source, cells[quadrant], canvas, mask, notes)
        negative_cells = [cell for i, cell in enumerate(cells) if i != quadrant]
        target_id = int(row["image_id"])

        negatives = None
        if mode == "retrieval":
            mined = row.get("negatives") or []
            has_list = index is not None and index < len(mined)
            candidates = list(dict.fromkeys(int(i) for i in mined[index])) if has_list else []
            if candidates:
                negatives = self._fill(canvas, negative_cells, candidates, target_id, rng, notes)
            if negatives is None:
                notes.append(f"no usable mined negatives for sentence {sent_id}: random mode")
                mode = "random"
        if mode == "random":
            negatives = self._fill(canvas, negative_cells, self.images.pool(), target_id, rng, notes)
            if negatives is None:
                notes.append("random pool empty or unreadable: single")
                return self._single(row, source, sentence, sent_id, notes)
        tile_ids = negatives[:quadrant] + [target_id] + negatives[quadrant:]
        return self._output(canvas, mask, box, sentence, sent_id, row, quadrant, tile_ids, mode, notes)

    def _single(self, row, source, sentence, sent_id, notes) -> dict:
        canvas, mask = self._new_canvas()
        size = self.output_size
        _, box = self._paint_target(row, source, (0, 0, size, size), canvas, mask, notes)
        return self._output(canvas, mask, box, sentence, sent_id, row, -1, [row["image_id"]], "single", notes)

    def _try_paint(self, image_id: int, cell, canvas, notes) -> bool:
        try:
            source = self.images.open(image_id)
            self._paint(source, Placement.fit(source.size, cell, self.tile), canvas)
            return True
        except KeyError:
            notes.append(f"negative {image_id} missing from images: replaced")
        except _DECODE_ERRORS as err:
            notes.append(f"negative {image_id} unreadable ({type(err).__name__}): replaced")
        return False

    def _fill(self, canvas, cells, candidates: Sequence[int], target_id: int, rng, notes) -> list[int] | None:
        """Paint ``cells`` with candidates (never the target's image) drawn without replacement; None if
        not one is usable. A bad candidate is replaced by the next; with too few usable ones, they repeat.
        """
        order = _shuffled(rng, candidates)
        painted: list[int] = []
        for cell in cells:
            for image_id in order:
                if image_id != target_id and self._try_paint(image_id, cell, canvas, notes):
                    painted.append(image_id)
                    break
            else:
                break
        if not painted:
            return None
        if len(painted) < len(cells):
            notes.append(f"only {len(painted)} usable negatives: repeated")
            usable = list(painted)
            for cell in cells[len(painted) :]:
                image_id = usable[int(rng.integers(len(usable)))]
                self._try_paint(image_id, cell, canvas, notes)
                painted.append(image_id)
        return painted


class EvalTransform(_Renderer):
    """Evaluation transform: the target image alone, resized (squash) or letterboxed to ``output_size``.

    One sentence per row: use rows from `explode_sentences` (a row with a single sentence also works).
    Adds ``orig_size`` [h, w], ``content_box`` [x0, y0, x1, y1] and ``orig_mask`` (the row's RLE, the
    ground truth at original size); `to_original` maps a prediction back.
    """

    def __init__(
        self,
        images,
        output_size: int = 480,
        tile: str = "squash",
        return_arrays: bool = False,
        sentence_key: str = "sent",
        fill: tuple[int, int, int] = DEFAULT_FILL,
        resample: str = "bilinear",
    ):
        super().__init__(images, output_size, tile, return_arrays, fill, resample)
        self.sentence_key = sentence_key

    def __repr__(self) -> str:
        return (
            f"EvalTransform(images={self.images!r}, output_size={self.output_size}, tile={self.tile!r}, "
            f"return_arrays={self.return_arrays})"
        )

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        return _columns([self.render(row) for row in _rows(batch)], EVAL_COLUMNS)

    def render(self, row: Mapping) -> dict:
        if "sentence" in row and "sent_id" in row:
            sentence, sent_id = row["sentence"], row["sent_id"]
        elif len(row.get("sentences") or []) == 1:
            sentence, sent_id = row["sentences"][0][self.sentence_key], row["sentences"][0]["sent_id"]
        else:
            raise ValueError(
                f"ref {row.get('ref_id')}: evaluation is per sentence; map the refs with explode_sentences first"
            )
        notes: list[str] = []
        source = self._open_target(row)
        canvas, mask = self._new_canvas()
        size = self.output_size
        placement, box = self._paint_target(row, source, (0, 0, size, size), canvas, mask, notes)
        out = self._output(canvas, mask, box, sentence, sent_id, row, -1, [row["image_id"]], "eval", notes)
        out["orig_size"] = [source.size[1], source.size[0]]
        out["content_box"] = list(placement.content_box)
        out["orig_mask"] = row["mask"]  # the ground truth at original size, for scoring at original resolution
        return out

    def to_original(self, pred, orig_size: Sequence[int], content_box: Sequence[float]) -> np.ndarray:
        """A prediction over the output square (any resolution) at the original image size; see geometry."""
        return prediction_to_original(pred, orig_size, content_box, self.output_size)


def _explode_batch(batch: Mapping[str, list]) -> dict[str, list]:
    out: dict[str, list] = {key: [] for key in batch}
    out["sentence"], out["sent_id"] = [], []
    for row in _rows(batch):
        for sentence in row["sentences"]:
            for key in batch:
                out[key].append(row[key])
            out["sentence"].append(sentence["sent"])
            out["sent_id"].append(sentence["sent_id"])
    return out


def explode_sentences(refs):
    """One row per sentence (every sentence of every ref), keeping the ref columns plus ``sentence``, ``sent_id``.

    Evaluation is per sentence; works on a Dataset and on a streaming IterableDataset.
    """
    features = refs.features.copy() if refs.features is not None else None
    if features is not None:
        features["sentence"] = datasets.Value("string")
        features["sent_id"] = datasets.Value("int64")
    return refs.map(_explode_batch, batched=True, features=features)


def _make_epoch_callback():
    from transformers import TrainerCallback

    class MosaicEpochCallback(TrainerCallback):
        """Passes the Trainer's epoch to a `NeMoMosaic` at each epoch begin.

        The Trainer calls ``on_epoch_begin`` before it iterates the DataLoader, so with
        ``persistent_workers=False`` (the default) the workers are started afterwards, from the
        transform as it is then, and render the new epoch. Persistent workers keep the copy they
        started with and would stay at their first epoch. Pass the transform object attached to the
        dataset (``set_transform`` after ``select``/``remove_columns``, which copy it) and keep
        ``remove_unused_columns=False``, as any ``set_transform`` dataset needs.
        """

        def __init__(self, transform: NeMoMosaic):
            self.transform = transform

        def __repr__(self) -> str:
            return f"MosaicEpochCallback({self.transform!r})"

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.transform.set_epoch(math.floor((state.epoch or 0) + 1e-6))

    MosaicEpochCallback.__module__ = __name__
    return MosaicEpochCallback


def __getattr__(name: str):
    # MosaicEpochCallback subclasses transformers.TrainerCallback; build it on first use so that
    # importing this module does not need transformers.
    if name == "MosaicEpochCallback":
        cls = _make_epoch_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
