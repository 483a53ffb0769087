"""NeMo mosaics rendered lazily per sample, and the matching evaluation transform.

`NeMoMosaic` is meant for ``Dataset.set_transform`` / ``with_transform`` (or ``IterableDataset.map(...,
batched=True)``): every call draws a sentence, a mode, a quadrant and the negatives afresh (`sampling`)
from a seed derived from (seed, epoch, ref_id), so a sample is the same whatever the DataLoader workers and
changes every epoch. `EvalTransform` renders evaluation rows (one sentence each, see
`explode_sentences`) with the same output columns plus what is needed to map a prediction back.

Speed: tiles are decoded at a reduced JPEG scale (`images.EncodedImage`) and then resized straight into
a numpy canvas (`geometry.resize_pixels`); the target mask is sampled from its RLE at tile resolution
(`geometry.rle_sample`), never decoded at full size. PIL comes in only for non-JPEG sources and for
the output image when arrays are not asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import datasets
import numpy as np
from PIL import Image

from .. import schema
from ..masks import encode_rle, is_int
from .geometry import RESAMPLE_MODES, TILE_MODES, Placement, grid_cells, mask_box, prediction_to_original
from .images import DECODE_ERRORS, OBJECTS_COLUMN, EncodedImage, ImageTable
from .sampling import Warmup, check_seed, draw_cell, draw_grid, draw_mode, draw_negatives, draw_sentence, normalise_p

OUTPUT_COLUMNS = (
    "image", "mask", "bbox", "sentence", "sent_id", "ref_id",
    "target_quadrant", "tile_image_ids", "mode", "notes",
)  # fmt: skip
EVAL_COLUMNS = OUTPUT_COLUMNS + ("orig_size", "content_box", "orig_mask")
GRIDS = (2, 3, "mix")
OBJECT_MASKS = ("array", "rle")
# Mean ImageNet colour: letterbox padding becomes ~0 after the usual normalisation.
DEFAULT_FILL = (124, 116, 104)


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
        if not is_int(output_size):
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
        except DECODE_ERRORS as err:
            raise ValueError(f"ref {row.get('ref_id')}: target image {image_id} cannot be read: {err}") from err

    def _paint(self, source: EncodedImage, placement: Placement, canvas: np.ndarray) -> None:
        placement.place_image(source.decode((placement.w, placement.h), self.layout), canvas, self.resample)

    def _paint_target(self, row, source, cell, canvas, mask_canvas, notes) -> tuple[Placement, list[float]]:
        """Target pixels and mask into ``cell``; returns the placement and the box of the rendered mask."""
        placement = Placement.fit(source.size, cell, self.tile)
        try:
            self._paint(source, placement, canvas)
        except DECODE_ERRORS as err:
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
    """Training transform: a 2x2 mosaic of the target and three negatives (``grid=3``: 3x3 and eight;
    ``grid="mix"``: 2x2 or 3x3 with probability 1/2 each per mosaic, the official loader's ``mix_grid``),
    drawn afresh per sample.

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
        grid: int | str = 2,
        return_objects: bool = False,
        object_masks: str = "array",
    ):
        if grid != "mix" and not (is_int(grid) and grid in GRIDS):
            raise ValueError(f"grid must be one of {GRIDS} (tiles per side), got {grid!r}")
        super().__init__(
            images, output_size, tile, return_arrays, fill, resample, pool=pool, config=config,
            return_objects=return_objects, object_masks=object_masks,
        )  # fmt: skip
        grid_cells(self.output_size, 3 if grid == "mix" else grid)  # validates the size
        self.grid = grid
        self.p = normalise_p(p if p is not None else {"single": 0.5, "retrieval": 0.5})
        if schedule is not None and not 0.0 <= schedule.p_random <= 1.0:
            raise ValueError(f"schedule.p_random must be in [0, 1], got {schedule.p_random}")
        self.schedule = schedule
        self.spatial_words = spatial_words
        self.seed = check_seed(seed, "seed")
        self.sentence_key = sentence_key
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draws depend on the epoch; see `MosaicEpochCallback` for Trainer and DataLoader workers."""
        self.epoch = check_seed(epoch, "epoch")

    def __repr__(self) -> str:
        p = {mode: round(v, 4) for mode, v in self.p.items() if v}
        return (
            f"NeMoMosaic(images={self.images!r}, output_size={self.output_size}, p={p}, schedule={self.schedule}, "
            f"tile={self.tile!r}, spatial_words={self.spatial_words}, seed={self.seed}, epoch={self.epoch}, "
            f"config={self.images.config!r}, return_arrays={self.return_arrays}, grid={self.grid!r}, "
            f"return_objects={self.return_objects})"
        )

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        return _columns([self.render(row) for row in _rows(batch)], self.columns)

    def mode_probabilities(self) -> dict[str, float]:
        return self.p if self.schedule is None else self.schedule.probabilities(self.epoch, self.p)

    def render(self, row: Mapping) -> dict:
        """One output row for one refs row (a dict of its columns)."""
        rng, index, sentence, sent_id = draw_sentence(row, self.seed, self.epoch, self.sentence_key)
        notes: list[str] = []
        source = self._open_target(row)
        split = row.get("split", schema.TRAIN_SPLIT)
        if split != schema.TRAIN_SPLIT:
            notes.append(f"split {split!r}: never mosaicked")
            mode = "single"
        else:
            mode = draw_mode(rng, self.mode_probabilities())
        if mode == "single":
            return self._single(row, source, sentence, sent_id, notes)

        spatial = row["sentences"][index] if (self.spatial_words and index is not None) else None
        grid = draw_grid(rng, self.grid)
        quadrant = draw_cell(rng, spatial, grid)
        cells = grid_cells(self.output_size, grid)
        canvas, mask = self._new_canvas()
        placement, box = self._paint_target(row, source, cells[quadrant], canvas, mask, notes)
        negative_cells = [cell for i, cell in enumerate(cells) if i != quadrant]
        paint = partial(self._paint_negative, canvas, notes)
        mode, negatives = draw_negatives(rng, mode, row, index, sent_id, self.images.pool, negative_cells, paint, notes)
        if negatives is None:
            return self._single(row, source, sentence, sent_id, notes)
        placements = [placement for _, placement in negatives]
        placements.insert(quadrant, placement)
        tile_ids = [image_id for image_id, _ in negatives]
        tile_ids.insert(quadrant, int(row["image_id"]))
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

    def _paint_negative(self, canvas, notes, image_id: int, cell) -> Placement | None:
        """The `sampling.draw_negatives` painter: None, with a note, for a missing or unreadable image."""
        try:
            source = self.images.open(image_id)
            placement = Placement.fit(source.size, cell, self.tile)
            self._paint(source, placement, canvas)
            return placement
        except KeyError:
            notes.append(f"negative {image_id} missing from images: replaced")
        except DECODE_ERRORS as err:
            notes.append(f"negative {image_id} unreadable ({type(err).__name__}): replaced")
        return None


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
