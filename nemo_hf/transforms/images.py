"""Reading images from the ``images`` config: an image's encoded bytes by image_id, decoded on demand.

Speed: a tile is a quarter of the output, so JPEGs are decoded at the smallest DCT scale whose result
still covers the tile (libjpeg-turbo scaling through simplejpeg); PIL comes in for other formats and for a
JPEG the strict fast path refuses: an image PIL decodes is an image (the build's rule, `nemo_hf.source.images`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image

from .. import schema
from ..masks import MAX_SIDE
from ..pixels import to_8bit

OBJECTS_COLUMN = "objects"
# What opening or decoding an unreadable image raises.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_JPEG_COLORSPACES = ("Gray", "YCbCr", "RGB")  # what libjpeg-turbo converts to RGB itself; CMYK/YCCK go through PIL


class EncodedImage:
    """An encoded image: its stored size read from the header, decoded on demand at a reduced scale.

    EXIF orientation is never applied: annotations refer to the stored pixel order. A header declaring a side
    over ``MAX_SIDE`` (the build's limit) is refused before any pixel is allocated.
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
        if not all(0 < side <= MAX_SIDE for side in self.size):
            raise ValueError(f"its header declares {self.size[0]}x{self.size[1]} px: sides are limited to {MAX_SIDE} px")

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
    """One chunk of an Image column: a cell's bytes as a view of the (memory-mapped) Arrow buffer.

    A cell without bytes is refused, its ``path`` never opened: a folder's row must not make a reader open a
    file it names (anything on the machine)."""

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
            raise ValueError(f"its row has no bytes but a path ({path!r}), which is never read: images must carry their bytes")
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
        try:
            return self._cells[place[0]].get(place[1])
        except ValueError as err:
            raise ValueError(f"image {image_id}: {err}") from None

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
        """The encoded image; KeyError when missing, one of `DECODE_ERRORS` when the header is unreadable."""
        data = self.bytes_of(image_id)
        if data is None:
            raise KeyError(image_id)
        return EncodedImage(data)
