"""Drawing shared by the pictures the inspection commands make: fonts, wrapped text, mask outlines."""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw, ImageFont

MASK_COLOUR = (255, 30, 60)
MASK_ALPHA = 0.15  # light: the object's own colour stays readable ("person in green" must look green)
CONTOUR_WIDTH = 2
HALO_COLOUR = (0, 0, 0)  # under every outline: visible on any background
TEXT_COLOUR = (20, 20, 20)
NOTE_COLOUR = (120, 120, 120)


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def draw_lines(draw: ImageDraw.ImageDraw, x: int, y: int, lines, fill, font, line_height: int) -> int:
    """Draw ``lines`` one under the other from (x, y); returns the y below the last."""
    for line in lines:
        draw.text((x, y), line, fill=fill, font=font)
        y += line_height
    return y


def mask_edge(mask: np.ndarray, width: int = CONTOUR_WIDTH) -> np.ndarray:
    """The mask's pixels within ``width`` of its outside (the image border counts as outside)."""
    inner = np.pad(mask.astype(bool), width)
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask.astype(bool) & ~inner[width:-width, width:-width]


def draw_outline(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """``image`` (h, w, 3 uint8, changed in place and returned) with ``mask``'s contour in ``colour`` over a
    one-pixel dark halo on both sides, so that a yellow outline stays visible on a yellow object."""
    edge = mask_edge(mask)
    halo = np.pad(edge, 1)
    halo = halo[1:-1, 1:-1] | halo[:-2, 1:-1] | halo[2:, 1:-1] | halo[1:-1, :-2] | halo[1:-1, 2:]
    image[halo & ~edge] = HALO_COLOUR
    image[edge] = colour
    return image


def outline_mask(image: np.ndarray, mask: np.ndarray, colour=MASK_COLOUR, alpha: float = MASK_ALPHA) -> np.ndarray:
    """``image`` (h, w, 3 uint8) with ``mask`` drawn as a haloed contour over a light tint."""
    mask = mask.astype(bool)
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(colour, np.float32)
    return draw_outline(out.round().astype(np.uint8), mask, colour)
