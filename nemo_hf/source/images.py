"""Source image files: whether an image is kept, and the bytes a build stores for it.

Kept iff PIL decodes it with its defaults (``Image.open(f).load()``, truncated files refused), as the
refer toolkit, LAVT and CARIS load images: never stricter, never more lenient. For speed a JPEG is
first decoded strictly by libjpeg-turbo at 1/8 scale; only when that reports a warning or an error is
it decoded in full by PIL, which either keeps it (the warning is noted) or confirms the damage.

Orientation: masks refer to the stored pixel order (as COCO and the refer toolkit do), but PIL's
``exif_transpose``, which the ``datasets`` Image feature applies, would rotate an image carrying an EXIF
(or XMP) orientation. The stored bytes get that tag set to 1, losslessly: the pixels are untouched.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

import simplejpeg
from PIL import Image

from ..pixels import to_8bit
from .refer import ReferFormatError

ORIENTATION_TAG = 0x0112
ROTATING = range(2, 9)  # the orientations exif_transpose acts on
_XMP_ORIENTATION = re.compile(rb'(tiff:Orientation(?:="|>))[2-8]')
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_LIBJPEG_COLORSPACES = ("Gray", "YCbCr", "RGB")  # what libjpeg-turbo converts to RGB itself; CMYK/YCCK go through PIL


@dataclass(frozen=True)
class ImageCheck:
    """What decoding an image file found."""

    size: tuple[int, int]  # (width, height) of the stored pixels
    warning: str | None = None  # the libjpeg warning PIL decoded past
    orientation: int | None = None  # an orientation in 2..8 that the stored bytes will neutralise


def check_image(data: bytes) -> ImageCheck:
    """Decode ``data`` as PIL would; raises (OSError, ValueError, ...) when PIL cannot decode it."""
    with Image.open(io.BytesIO(data)) as im:  # PIL's header parse and decompression-bomb check
        size = im.size
        orientation = im.getexif().get(ORIENTATION_TAG)
        said = _libjpeg_says(data) if im.format == "JPEG" else None
        if said is None:  # not a JPEG libjpeg-turbo decodes here (PNG, CMYK, ...): PIL, at 1/8 where it can
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            to_8bit(im)  # refuses pixels with no 8-bit meaning
        elif said:  # a libjpeg warning or real damage: PIL's full decode tells which
            to_8bit(im)
    warning = said or None
    if orientation not in ROTATING:
        return ImageCheck(size, warning)
    neutral_orientation(data)  # raises if it cannot be done losslessly
    return ImageCheck(size, warning, orientation)


def _libjpeg_says(data: bytes) -> str | None:
    """What a strict libjpeg-turbo decode of ``data`` at 1/8 scale said: "" for nothing, else its warning
    or error; None for a JPEG it does not decode here (CMYK, YCCK, an odd header: PIL's job)."""
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in _LIBJPEG_COLORSPACES:
            return None
    except ValueError:
        return None
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=1, min_height=1, strict=True)
    except ValueError as err:
        return str(err) or type(err).__name__
    return ""


def stored_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def neutral_orientation(data: bytes) -> bytes:
    """``data`` with every EXIF and XMP orientation of 2..8 set to 1, pixels and length unchanged
    (``data`` itself when there is none). JPEG and PNG; a `ReferFormatError` for an orientation it cannot reach."""
    with Image.open(io.BytesIO(data)) as im:
        if im.getexif().get(ORIENTATION_TAG) not in ROTATING:
            return data
        kind = im.format
    out = bytearray(data)
    if kind == "JPEG":
        _neutralise_jpeg(out)
    elif kind == "PNG":
        _neutralise_png(out)
    with Image.open(io.BytesIO(bytes(out))) as im:
        if im.getexif().get(ORIENTATION_TAG) in ROTATING:
            raise ReferFormatError(
                f"carries an EXIF orientation that nemo_hf cannot set to 1 without re-encoding (a {kind} file; "
                "it can in JPEG and PNG): its masks follow the stored pixels, which readers would rotate"
            )
    return bytes(out)


def _neutralise_jpeg(out: bytearray) -> None:
    """In place: the orientation in the APP1 Exif and XMP segments before the first scan."""
    i = 2
    while i + 4 <= len(out) and out[i] == 0xFF:
        marker = out[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no metadata after
            return
        end = min(len(out), i + 2 + int.from_bytes(out[i + 2 : i + 4], "big"))
        start = i + 4
        if marker == 0xE1 and out[start : start + 6] == b"Exif\x00\x00":
            _neutralise_tiff(out, start + 6, end)
        elif marker == 0xE1 and out[start : start + len(_XMP_PREFIX)] == _XMP_PREFIX:
            out[start:end] = _XMP_ORIENTATION.sub(rb"\g<1>1", bytes(out[start:end]))
        i = end


def _neutralise_png(out: bytearray) -> None:
    """In place: the orientation in the eXIf chunk and an uncompressed XMP iTXt chunk, CRCs recomputed."""
    i = 8
    while i + 12 <= len(out):
        length = int.from_bytes(out[i : i + 4], "big")
        kind, start, end = bytes(out[i + 4 : i + 8]), i + 8, i + 8 + length
        if end + 4 > len(out):
            return
        if kind == b"eXIf":
            _neutralise_tiff(out, start, end)
        elif kind == b"iTXt" and out[start:end].startswith(b"XML:com.adobe.xmp\x00\x00"):
            out[start:end] = _XMP_ORIENTATION.sub(rb"\g<1>1", bytes(out[start:end]))
        if kind in (b"eXIf", b"iTXt"):
            out[end : end + 4] = zlib.crc32(out[i + 4 : end]).to_bytes(4, "big")
        if kind == b"IEND":
            return
        i = end + 4


def _neutralise_tiff(out: bytearray, start: int, end: int) -> None:
    """In place: IFD0's orientation entry of the TIFF structure ``out[start:end]`` set to 1."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(out[start : start + 2]))
    if order is None or end - start < 8:
        return
    ifd = start + int.from_bytes(out[start + 4 : start + 8], order)
    if ifd + 2 > end:
        return
    for n in range(int.from_bytes(out[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * n
        if entry + 12 > end:
            return
        if int.from_bytes(out[entry : entry + 2], order) == ORIENTATION_TAG:
            width = {3: 2, 4: 4}.get(int.from_bytes(out[entry + 2 : entry + 4], order))  # SHORT or LONG
            if width is not None:
                out[entry + 8 : entry + 8 + width] = (1).to_bytes(width, order)
            return
