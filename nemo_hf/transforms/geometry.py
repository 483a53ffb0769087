"""One piece of geometry for the image, the mask and the box of a tile.

A `Placement` says where a source image of a given size lands in the output. The transforms apply
the same placement to the pixels (resize + paste), to the mask (nearest-neighbour sampling of the RLE)
and to the box, so the three can never drift apart.

Pixels are resized by torch's antialiased uint8 kernels: PIL's filters (same weights), vectorised
for interleaved RGB or RGBX, so a tile costs a fraction of PIL's resize and no conversion to or from PIL.

Conventions: sizes are (width, height), boxes [x, y, w, h] or [x0, y0, x1, y1] in pixels with
the origin at the top-left corner of the top-left pixel; masks are uint8 arrays of shape (h, w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from ..masks import rle_sample

TILE_MODES = ("squash", "letterbox")
# Tile filters after the DCT-scaled decode (which leaves a factor between 1/2 and 1), both antialiased:
# bilinear is the default, bicubic a little sharper and ~10% dearer (bench/bench_mosaic.py).
RESAMPLE_MODES = ("bilinear", "bicubic")


def grid_cells(output_size: int, grid: int = 2) -> list[tuple[int, int, int, int]]:
    """The ``grid`` x ``grid`` cells (x, y, w, h), row-major: for 2x2, 0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right; for 3x3, 0-2 the top row, 3-5 the middle one, 6-8 the bottom one.

    Cell edges sit at ``k * output_size // grid``, so the cells tile the output exactly and a side that does
    not divide evenly gives its extra pixels to the later rows/columns (417 -> 208 + 209; 3x3: 139 + 139 + 139).
    """
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    if output_size < grid:
        raise ValueError(f"output_size must be at least {grid} for a {grid}x{grid} grid, got {output_size}")
    edges = [k * output_size // grid for k in range(grid + 1)]
    spans = [(a, b - a) for a, b in zip(edges, edges[1:])]
    return [(x, y, w, h) for (y, h) in spans for (x, w) in spans]


@dataclass(frozen=True)
class Placement:
    """A source image of size (src_w, src_h) drawn into the content rect (x, y, w, h) of the output."""

    src_w: int
    src_h: int
    x: int
    y: int
    w: int
    h: int

    @classmethod
    def fit(cls, src_size: Sequence[int], cell: Sequence[int], tile: str = "squash") -> "Placement":
        """Place a source into a cell (x, y, w, h).

        ``squash`` fills the cell and loses the aspect ratio (the NeMo paper's tiles); ``letterbox``
        keeps it, centring the scaled image in the cell (the rest is padding).
        """
        src_w, src_h = (int(v) for v in src_size)
        cx, cy, cw, ch = (int(v) for v in cell)
        if src_w < 1 or src_h < 1:
            raise ValueError(f"empty source image of size {src_w}x{src_h}")
        if tile == "squash":
            return cls(src_w, src_h, cx, cy, cw, ch)
        if tile == "letterbox":
            scale = min(cw / src_w, ch / src_h)
            w = min(cw, max(1, round(src_w * scale)))
            h = min(ch, max(1, round(src_h * scale)))
            return cls(src_w, src_h, cx + (cw - w) // 2, cy + (ch - h) // 2, w, h)
        raise ValueError(f"unknown tile mode {tile!r}; expected one of {TILE_MODES}")

    @property
    def scale_x(self) -> float:
        return self.w / self.src_w

    @property
    def scale_y(self) -> float:
        return self.h / self.src_h

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """Where the image sits in the output, [x0, y0, x1, y1] (x1, y1 exclusive)."""
        return (self.x, self.y, self.x + self.w, self.y + self.h)

    def source_rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        """For each content pixel row/column, the source row/column its centre falls in (nearest neighbour)."""
        return pixel_centres(self.h, self.src_h), pixel_centres(self.w, self.src_w)

    def place_image(self, pixels: np.ndarray, canvas: np.ndarray, resample: str = "bilinear") -> None:
        """Resize ``pixels`` (uint8 HxWxC: the whole source, possibly decoded at a reduced scale) into the content rect."""
        target = canvas[self.y : self.y + self.h, self.x : self.x + self.w]
        target[...] = pixels if pixels.shape[:2] == (self.h, self.w) else resize_pixels(pixels, (self.w, self.h), resample)

    def place_mask(self, rle: dict, canvas: np.ndarray) -> np.ndarray:
        """Sample the source RLE at the content resolution, write it into ``canvas``; return the content-sized mask."""
        if [int(v) for v in rle["size"]] != [self.src_h, self.src_w]:
            size = [self.src_h, self.src_w]
            raise ValueError(f"mask size {list(rle['size'])} (h, w) does not match the image size {size}")
        rows, cols = self.source_rows_cols()
        mask = rle_sample(rle, rows, cols)
        canvas[self.y : self.y + self.h, self.x : self.x + self.w] = mask
        return mask

    def map_box(self, bbox: Sequence[float]) -> list[float]:
        """Map a source box [x, y, w, h] to output pixels, clipped to the content rect."""
        x0, y0, bw, bh = (float(v) for v in bbox)
        x0_out = min(max(self.x + x0 * self.scale_x, self.x), self.x + self.w)
        y0_out = min(max(self.y + y0 * self.scale_y, self.y), self.y + self.h)
        x1_out = min(max(self.x + (x0 + bw) * self.scale_x, self.x), self.x + self.w)
        y1_out = min(max(self.y + (y0 + bh) * self.scale_y, self.y), self.y + self.h)
        return [x0_out, y0_out, x1_out - x0_out, y1_out - y0_out]


def resize_pixels(pixels: np.ndarray, size: Sequence[int], resample: str = "bilinear") -> np.ndarray:
    """uint8 HxWxC -> (h, w, C) for ``size`` (w, h), with the ``resample`` filter (`RESAMPLE_MODES`)."""
    import torch
    import torch.nn.functional as F

    if resample not in RESAMPLE_MODES:
        raise ValueError(f"unknown resample {resample!r}; expected one of {RESAMPLE_MODES}")
    pixels = np.require(pixels, np.uint8, ["C", "W"])  # torch reads it in place
    h, w, c = pixels.shape
    # an NCHW view of the interleaved pixels, with a batch stride that makes it unambiguously channels-last:
    # the uint8 kernels then read it without a copy and return channels-last, i.e. interleaved, pixels
    source = torch.from_numpy(pixels).as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
    out = F.interpolate(source, size=(size[1], size[0]), mode=resample, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def pixel_centres(n_out: int, n_src: int) -> np.ndarray:
    """For each of ``n_out`` pixels spread over ``n_src``, the source pixel its centre falls in (nearest neighbour)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_src / n_out)).astype(np.intp), n_src - 1)


def mask_box(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[float] | None:
    """Tight box [x, y, w, h] around the non-zero pixels (pixel edges, so a single pixel is 1x1), or None if empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    x0, y0 = int(cols[0]) + offset[0], int(rows[0]) + offset[1]
    return [float(x0), float(y0), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def prediction_to_original(
    pred, orig_size: Sequence[int], content_box: Sequence[float], output_size: int
) -> np.ndarray:
    """Map a prediction over the whole output (any resolution: mask or logits) back to the original image.

    ``pred`` is a 2-D array (or anything ``np.asarray`` takes, e.g. a CPU tensor) covering the
    ``output_size`` square; ``orig_size`` is [h, w] and ``content_box`` [x0, y0, x1, y1] from the eval
    transform's row. Floats (logits, probabilities) are resampled bilinearly and come back float32,
    so threshold after mapping; integers and booleans (masks, labels) by nearest neighbour, uint8.
    """
    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise ValueError(f"prediction must be 2-D (h, w), got shape {pred.shape}")
    pred_h, pred_w = pred.shape
    sx, sy = pred_w / output_size, pred_h / output_size
    x0, y0, x1, y1 = (float(v) for v in content_box)
    box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    orig_h, orig_w = (int(v) for v in orig_size)
    if np.issubdtype(pred.dtype, np.floating):
        image = Image.fromarray(pred.astype(np.float32), mode="F")
        return np.asarray(image.resize((orig_w, orig_h), Image.Resampling.BILINEAR, box=box))
    image = Image.fromarray(pred.astype(np.uint8), mode="L")
    return np.asarray(image.resize((orig_w, orig_h), Image.Resampling.NEAREST, box=box))
