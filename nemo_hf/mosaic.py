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
from .pixels import to_8bit
from .refer import encode_rle

MODES = ("single", "random", "retrieval")
OUTPUT_COLUMNS = (
    "image", "mask", "bbox", "sentence", "sent_id", "ref_id",
    "target_quadrant", "tile_image_ids", "mode", "notes",
)  # fmt: skip
EVAL_COLUMNS = OUTPUT_COLUMNS + ("orig_size", "content_box", "orig_mask")
OBJECTS_COLUMN = "objects"  # with return_objects=True
GRIDS = (2, 3)
OBJECT_MASKS = ("array", "rle")

# Whole words that pin the target to a side of the grid: the first or last column, the first or last row
# (the official loader's list; for 2x2, tiles row-major 0 TL, 1 TR, 2 BL, 3 BR).
SPATIAL_WORDS = {
    "left": "left",
    "right": "right",
    **{w: "top" for w in ("top", "high", "above")},
    **{w: "bottom" for w in ("bottom", "low", "below", "under", "beneath")},
}
# Mean ImageNet colour: letterbox padding becomes ~0 after the usual normalisation.
DEFAULT_FILL = (124, 116, 104)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_JPEG_COLORSPACES = ("Gray", "YCbCr", "RGB")  # what libjpeg-turbo converts to RGB itself; CMYK/YCCK go through PIL


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
        return np.array(to_8bit(image, layout))  # a 16-bit PNG scaled, not clipped to white


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
        self._index: dict[int, tuple[int, int, int]] | None = None
        self._cells = None
        self._pool: list[int] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_index": None, "_cells": None, "_pool": None}

    @property
    def has_objects(self) -> bool:
        """Whether the table carries the ``objects`` column (folders built before it do not)."""
        if isinstance(self.images, Mapping):
            return True  # a Mapping value may be {"bytes": ..., "objects": [...]}; plain bytes mean none
        return OBJECTS_COLUMN in self.images.column_names

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        kind = "Mapping" if isinstance(self.images, Mapping) else "Dataset"
        return f"<{kind} of {len(self)} images>"

    def _dataset_index(self) -> dict[int, tuple[int, int, int]]:
        """image_id -> (chunk, offset) in the Arrow ``image`` column and the table row, over the rows the Dataset shows."""
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
            self._index = {int(i): (int(c), int(o), int(r)) for i, c, o, r in zip(ids, chunk, offset, rows)}
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

    def objects_of(self, image_id: int) -> list[dict]:
        """The image's ``objects`` (schema.OBJECT, source coordinates); [] for an image the table lacks."""
        if isinstance(self.images, Mapping):
            data = self.images.get(int(image_id))
            return list(data.get(OBJECTS_COLUMN) or []) if isinstance(data, Mapping) else []
        place = self._dataset_index().get(int(image_id))
        if place is None:
            return []
        return self.images.data.table.column(OBJECTS_COLUMN)[place[2]].as_py() or []

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
    numbers = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in p.values())
    if not numbers or not all(math.isfinite(v) and v >= 0 for v in p.values()) or sum(p.values()) <= 0:
        raise ValueError(f"mode probabilities must be finite, non-negative and not all zero, got {dict(p)}")
    total = sum(p.values())
    return {mode: p.get(mode, 0.0) / total for mode in MODES}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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

    def __init__(
        self, images, output_size, tile, return_arrays, fill, resample, pool=None, config=None,
        return_objects=False, object_masks="array",
    ):  # fmt: skip
        if tile not in TILE_MODES:
            raise ValueError(f"unknown tile mode {tile!r}; expected one of {TILE_MODES}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"unknown resample {resample!r}; expected one of {RESAMPLE_MODES}")
        if isinstance(images, ImageTable) and (pool is not None or config not in (None, images.config)):
            # the table carries its own config and pool: a different one here would be ignored, and a table
            # built for another config would draw that config's pool (its val/test images included) as tiles
            raise ValueError(
                f"images is an ImageTable for config {images.config!r}; pass config= and pool= when the table is "
                f"made, not here (got config={config!r}, pool={'given' if pool is not None else None})"
            )
        self.images = images if isinstance(images, ImageTable) else ImageTable(images, pool=pool, config=config)
        if not _is_int(output_size):
            raise ValueError(f"output_size must be an integer number of pixels, got {output_size!r}")
        self.output_size = int(output_size)
        grid_cells(self.output_size)  # validates the size
        self.tile = tile
        self.return_arrays = return_arrays
        self.fill = tuple(fill)
        self.resample = resample
        if object_masks not in OBJECT_MASKS:
            raise ValueError(f"unknown object_masks {object_masks!r}; expected one of {OBJECT_MASKS}")
        if return_objects and not self.images.has_objects:
            raise ValueError(
                "return_objects=True needs the images config's 'objects' column, which this table lacks "
                "(a folder built by an older nemo_hf): rebuild it with `nemo-hf build`"
            )
        self.return_objects = bool(return_objects)
        self.object_masks = object_masks

    @property
    def columns(self) -> tuple[str, ...]:
        return self._base_columns + ((OBJECTS_COLUMN,) if self.return_objects else ())

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

    def _objects(self, row, tiles, target_tile: int, notes) -> list[dict]:
        """Every instance of every tile, its mask and box mapped through the tile's placement, as the target's.

        ``tiles``: (tile index, image id, placement). Masks are output-sized uint8 arrays, or COCO RLE at the
        output size with ``object_masks="rle"``; the box is the tight box of the mapped mask (the instance's
        own box mapped when the mask vanishes), the rule the target's ``bbox`` follows.
        """
        size = self.output_size
        target_ann = int(row["ann_id"]) if row.get("ann_id") is not None else None
        out = []
        for tile, image_id, placement in tiles:
            objects = self.images.objects_of(image_id)
            if tile == target_tile and target_ann not in {int(o["ann_id"]) for o in objects}:
                notes.append(f"target annotation {target_ann} is not among image {image_id}'s objects: taken from the row")
                objects = objects + [
                    {"ann_id": target_ann, "category_id": row.get("category_id"), "category": row.get("category", ""),
                     "supercategory": "", "bbox": row.get("bbox"), "iscrowd": False, "mask": row["mask"]}
                ]  # fmt: skip
            for obj in objects:
                canvas = np.zeros((size, size), dtype=np.uint8)
                try:
                    mapped = placement.place_mask(obj["mask"], canvas)
                except ValueError as err:
                    raise ValueError(f"image {image_id}, annotation {obj['ann_id']}: {err}") from err
                box = mask_box(mapped, (placement.x, placement.y)) or placement.map_box(obj.get("bbox") or (0, 0, 0, 0))
                out.append(
                    {
                        "ann_id": int(obj["ann_id"]),
                        "category_id": obj.get("category_id"),
                        "category": obj.get("category", ""),
                        "supercategory": obj.get("supercategory", ""),
                        "iscrowd": bool(obj.get("iscrowd", False)),
                        "is_target": tile == target_tile and int(obj["ann_id"]) == target_ann,
                        "tile": tile,
                        "bbox": box,
                        "area": int(np.count_nonzero(mapped)),
                        "mask": encode_rle(canvas) if self.object_masks == "rle" else canvas,
                    }
                )
        return out

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
    """Training transform: a 2x2 mosaic of the target and three negatives (``grid=3``: 3x3 and eight,
    the official loader's option), drawn afresh per sample.

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
    ``return_objects=True`` adds ``objects``: every instance of every tile (from the images config's
    ``objects``) mapped through its tile's placement, with ``is_target`` and ``tile``; ``object_masks="rle"``
    gives their masks as COCO RLE at the output size instead of arrays.
    """

    _base_columns = OUTPUT_COLUMNS

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
        grid: int = 2,
        return_objects: bool = False,
        object_masks: str = "array",
    ):
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS} (tiles per side), got {grid!r}")
        super().__init__(
            images, output_size, tile, return_arrays, fill, resample, pool=pool, config=config,
            return_objects=return_objects, object_masks=object_masks,
        )  # fmt: skip
        grid_cells(self.output_size, grid)  # validates the size
        self.grid = grid
        self.p = _normalised(p if p is not None else {"single": 0.5, "retrieval": 0.5})
        if schedule is not None and not 0.0 <= schedule.p_random <= 1.0:
            raise ValueError(f"schedule.p_random must be in [0, 1], got {schedule.p_random}")
        self.schedule = schedule
        self.spatial_words = spatial_words
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
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
            f"config={self.images.config!r}, return_arrays={self.return_arrays}, grid={self.grid}, "
            f"return_objects={self.return_objects})"
        )

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        return _columns([self.render(row) for row in _rows(batch)], self.columns)

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
        quadrants = spatial_quadrants(words, self.grid)
        quadrant = quadrants[int(rng.integers(len(quadrants)))]
        cells = grid_cells(self.output_size, self.grid)
        canvas, mask = self._new_canvas()
        placement, box = self._paint_target(row, source, cells[quadrant], canvas, mask, notes)
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
        placements = [placement for _, placement in negatives]
        placements.insert(quadrant, placement)
        tile_ids = [image_id for image_id, _ in negatives]
        tile_ids.insert(quadrant, target_id)
        out = self._output(canvas, mask, box, sentence, sent_id, row, quadrant, tile_ids, mode, notes)
        if self.return_objects:
            out[OBJECTS_COLUMN] = self._objects(row, list(zip(range(len(tile_ids)), tile_ids, placements)), quadrant, notes)
        return out

    def _single(self, row, source, sentence, sent_id, notes) -> dict:
        canvas, mask = self._new_canvas()
        size = self.output_size
        placement, box = self._paint_target(row, source, (0, 0, size, size), canvas, mask, notes)
        out = self._output(canvas, mask, box, sentence, sent_id, row, -1, [row["image_id"]], "single", notes)
        if self.return_objects:
            out[OBJECTS_COLUMN] = self._objects(row, [(0, int(row["image_id"]), placement)], 0, notes)
        return out

    def _try_paint(self, image_id: int, cell, canvas, notes) -> Placement | None:
        try:
            source = self.images.open(image_id)
            placement = Placement.fit(source.size, cell, self.tile)
            self._paint(source, placement, canvas)
            return placement
        except KeyError:
            notes.append(f"negative {image_id} missing from images: replaced")
        except _DECODE_ERRORS as err:
            notes.append(f"negative {image_id} unreadable ({type(err).__name__}): replaced")
        return None

    def _fill(self, canvas, cells, candidates: Sequence[int], target_id: int, rng, notes) -> list[tuple[int, Placement]] | None:
        """Paint ``cells`` with candidates (never the target's image) drawn without replacement; None if
        not one is usable. A bad candidate is replaced by the next; with too few usable ones, they repeat.
        Returns (image id, placement) per cell.
        """
        order = _shuffled(rng, candidates)
        painted: list[tuple[int, Placement]] = []
        for cell in cells:
            for image_id in order:
                placement = self._try_paint(image_id, cell, canvas, notes) if image_id != target_id else None
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
                painted.append((image_id, self._try_paint(image_id, cell, canvas, notes)))
        return painted


class EvalTransform(_Renderer):
    """Evaluation transform: the target image alone, resized (squash) or letterboxed to ``output_size``.

    One sentence per row: use rows from `explode_sentences` (a row with a single sentence also works).
    Adds ``orig_size`` [h, w], ``content_box`` [x0, y0, x1, y1] and ``orig_mask`` (the row's RLE, the
    ground truth at original size); `to_original` maps a prediction back. ``return_objects`` and
    ``object_masks`` as for `NeMoMosaic` (one tile, 0).
    """

    _base_columns = EVAL_COLUMNS

    def __init__(
        self,
        images,
        output_size: int = 480,
        tile: str = "squash",
        return_arrays: bool = False,
        sentence_key: str = "sent",
        fill: tuple[int, int, int] = DEFAULT_FILL,
        resample: str = "bilinear",
        return_objects: bool = False,
        object_masks: str = "array",
    ):
        super().__init__(
            images, output_size, tile, return_arrays, fill, resample,
            return_objects=return_objects, object_masks=object_masks,
        )  # fmt: skip
        self.sentence_key = sentence_key

    def __repr__(self) -> str:
        return (
            f"EvalTransform(images={self.images!r}, output_size={self.output_size}, tile={self.tile!r}, "
            f"return_arrays={self.return_arrays}, return_objects={self.return_objects})"
        )

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        return _columns([self.render(row) for row in _rows(batch)], self.columns)

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
        if self.return_objects:
            out[OBJECTS_COLUMN] = self._objects(row, [(0, int(row["image_id"]), placement)], 0, notes)
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
