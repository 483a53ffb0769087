"""Proposal crops as TAS makes them, from an image (uint8 HxWx3) and a proposal mask (HxW).

CLIP crop: the image times the mask (black background), cut to the mask's box, the shorter side padded
with black by ``(long - short) // 2`` on each side (so an odd difference stays one pixel short of a
square, as in TAS). The model's own processor then resizes and centre-crops it.
Captioner crop: the same, over the image's background blurred with a 75x75 Gaussian instead of black.

The box (``box=``): ``"tas"`` (default) is SAM's xywh box as TAS cuts it (tas_main.py lines 88-90:
``masked[y : y + h, x : x + w]`` with SAM's ``w = max_x - min_x``, ``h = max_y - min_y``), so the mask's
last row and last column fall outside the crop; ``"extent"`` is the mask's full extent.
"""

from __future__ import annotations

import numpy as np
import torch

BLUR_KERNEL = 75
CROP_BOXES = ("tas", "extent")


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), half-open, of the mask's non-zero pixels; None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_box(mask: np.ndarray, box: str = "tas") -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), half-open, of the crop: TAS's box (one row and one column short of the extent) or
    the full ``"extent"``; None when the mask is empty. A mask one pixel thin leaves TAS's box empty (TAS
    never meets one: its proposals have at least 2,000 px): the extent is used then."""
    if box not in CROP_BOXES:
        raise ValueError(f"crop box {box!r}: expected one of {', '.join(CROP_BOXES)}")
    bounds = mask_bounds(mask)
    if bounds is None or box == "extent":
        return bounds
    y0, y1, x0, x1 = bounds
    return (y0, y1 - 1, x0, x1 - 1) if y1 - y0 > 1 and x1 - x0 > 1 else bounds


def pad_to_square(pixels: np.ndarray) -> np.ndarray:
    """Black bands of ``(long - short) // 2`` on both sides of the shorter dimension."""
    h, w = pixels.shape[:2]
    pad = abs(h - w) // 2
    widths = ((pad, pad), (0, 0)) if h < w else ((0, 0), (pad, pad))
    return np.pad(pixels, widths + ((0, 0),) * (pixels.ndim - 2))


def masked_crop(
    image: np.ndarray, mask: np.ndarray, background: np.ndarray | None = None, box: str = "tas"
) -> np.ndarray:
    """The proposal over ``background`` (black when None), cut to `crop_box`, padded to a square."""
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} for an image of shape {image.shape[:2]}")
    bounds = crop_box(mask, box)
    if bounds is None:
        raise ValueError("empty proposal mask: nothing to crop")
    y0, y1, x0, x1 = bounds
    inside = mask[y0:y1, x0:x1, None]
    back = 0 if background is None else background[y0:y1, x0:x1]
    return pad_to_square(np.where(inside, image[y0:y1, x0:x1], back).astype(np.uint8, copy=False))


def gaussian_blur(image: np.ndarray, ksize: int = BLUR_KERNEL) -> np.ndarray:
    """OpenCV's ``GaussianBlur(image, (ksize, ksize), 0)``: sigma ``0.3 * ((ksize - 1) / 2 - 1) + 0.8``,
    border reflected without repeating the edge pixel (BORDER_REFLECT_101), separable."""
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    taps = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    channels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[:, None]  # (3, 1, H, W)
    half = ksize // 2
    h, w = image.shape[:2]
    rows = torch.from_numpy(_reflect101(h, half))
    cols = torch.from_numpy(_reflect101(w, half))
    out = torch.nn.functional.conv2d(channels.index_select(3, cols), kernel.view(1, 1, 1, -1))
    out = torch.nn.functional.conv2d(out.index_select(2, rows), kernel.view(1, 1, -1, 1))
    return out[:, 0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _reflect101(size: int, pad: int) -> np.ndarray:
    """Source indices of ``-pad .. size + pad - 1`` reflected about the edge pixels (any size, any pad)."""
    period = np.concatenate([np.arange(size), np.arange(size - 2, 0, -1)]) if size > 1 else np.zeros(1, np.int64)
    return period[np.arange(-pad, size + pad) % len(period)]


def blurred_crop(
    image: np.ndarray, mask: np.ndarray, blurred: np.ndarray | None = None, box: str = "tas"
) -> np.ndarray:
    """The captioner's crop; pass ``blurred`` (`gaussian_blur` of the image) to blur once per image."""
    return masked_crop(image, mask, gaussian_blur(image) if blurred is None else blurred, box)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(mean row, mean column) of the mask's pixels, as floats; TAS keeps ``int()`` of them (tas_main.py
    lines 521-523), which `scoring.tas_rectify` applies itself."""
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())
