"""Stored images to 8-bit pixels.

PIL's ``convert`` clips high-bit-depth values instead of scaling them: a 16-bit greyscale PNG would
become a solid white image. Every decoder in nemo_hf (the build's image check, the embedder, the
mosaic) goes through `to_8bit`, so such an image is scaled once, the same way everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# integer greyscale modes holding 16-bit values (PNG and TIFF); "I" is how some readers load them
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` in ``mode`` (a PIL mode such as RGB or RGBX), 16-bit values scaled to 0..255.

    Raises ValueError for pixels with no 8-bit meaning (floating point, or integers outside 0..65535).
    """
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} pixels outside 0..65535 cannot be scaled to 8 bits")
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("floating-point pixels (mode F) have no 8-bit meaning; save the image with 8 or 16 bits")
    return image.convert(mode)
