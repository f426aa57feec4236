"""Decoding images of any size within bounded memory, for ``raysseg predict`` and ``raysseg evaluate``.

An image's size is read from its header and checked against ``data.max_pixels`` before any pixel is decoded
(that bound replaces PIL's decompression-bomb check, ``Image.MAX_IMAGE_PIXELS``, in these decodes). A JPEG
whose model input is much smaller than the image is decoded at a reduced scale (1/2, 1/4 or 1/8 of each side:
PIL's ``draft``, done by the JPEG decoder itself), so its full-resolution RGB is never held; its sides stay at
least ``DRAFT_GAP`` times the model input's (Pillow's ``reducing_gap``), so the input is as fine as from a full
decode. Other formats, and a JPEG that cannot be reduced, are decoded whole by :func:`decode_image`.
"""
from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from raysseg.core.label_maps import input_size
from raysseg.io.images import decode_image

DRAFT_GAP = 2
ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # as ImageOps.exif_transpose
_PIL_CHECK = threading.Lock()


class TooLargeError(ValueError):
    """An image has more pixels than ``data.max_pixels``."""


@contextlib.contextmanager
def own_pixel_bound() -> Iterator[None]:
    """PIL's decompression-bomb check off meanwhile: these decodes check ``max_pixels`` from the header
    themselves, before decoding (PIL would warn above 89 MP and refuse above 179 MP whatever the setting)."""
    with _PIL_CHECK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """One TooLargeError line when a ``width`` x ``height`` image exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise TooLargeError(f"{width}x{height} = {width * height:,} pixels, more than data.max_pixels "
                            f"({max_pixels:,}): split or downscale the image, or raise data.max_pixels")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored, as decode_image does
        return 1


@dataclass
class Decoded:
    """One decoded image: ``input`` the model's input (h, w, 3) uint8 (bilinear, :func:`input_size`), ``size``
    the image's (H, W) as shown (turned by its EXIF orientation), ``full`` its pixels (H, W, 3) when asked."""

    input: np.ndarray
    size: tuple[int, int]
    full: np.ndarray | None = None


def _reduced(im: Image.Image, short_side: int, multiple: int) -> Decoded | None:
    """The model input of a JPEG decoded at a reduced scale, or None when it cannot be reduced."""
    turn = _TRANSPOSE.get(_orientation(im))
    swapped = turn in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                       Image.Transpose.ROTATE_270)
    stored = im.size  # (W, H) as stored
    height, width = (stored[0], stored[1]) if swapped else (stored[1], stored[0])
    h, w = input_size(height, width, short_side, multiple)
    want = (h, w) if swapped else (w, h)  # the input's (W, H) as stored
    if min(stored[0] // (DRAFT_GAP * want[0]), stored[1] // (DRAFT_GAP * want[1])) < 2:
        return None
    drafted = im.draft("RGB", (DRAFT_GAP * want[0], DRAFT_GAP * want[1]))
    if drafted is None or im.size == stored:
        return None
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's truncated/broken-file errors
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"truncated or corrupt {im.format or 'image'} file ({reason})") from None
    # resized as stored (the box: the part of the reduced pixels that covers the image), then turned upright
    small = im.convert("RGB").resize(want, Image.BILINEAR, box=drafted[1])
    return Decoded(np.asarray(small.transpose(turn) if turn is not None else small), (height, width))


def _opened(data: bytes, max_pixels: int) -> Image.Image | None:
    """``data`` opened (its header read, no pixel decoded; call inside :func:`own_pixel_bound`): TooLargeError over
    ``max_pixels``; None for bytes PIL cannot identify (:func:`decode_image` names the problem, or reads a
    TIFF PIL cannot open with tifffile)."""
    try:
        im = Image.open(io.BytesIO(data)) if data else None
    except UnidentifiedImageError:
        return None
    if im is not None and im.width * im.height > max_pixels:
        im.close()
        check_pixels(im.width, im.height, max_pixels)
    return im


def decode_bounded(data: bytes, max_pixels: int) -> Image.Image:
    """:func:`decode_image` of an image of at most ``max_pixels`` pixels (checked from its header before any
    pixel is decoded; more: TooLargeError); the reader of ``raysseg evaluate``."""
    with own_pixel_bound():
        im = _opened(data, max_pixels)
        if im is not None:
            im.close()
        image = decode_image(data)
    check_pixels(image.width, image.height, max_pixels)  # a TIFF read by tifffile: known once decoded
    return image


def decode_for_model(data: bytes, short_side: int, multiple: int, max_pixels: int, full: bool = False) -> Decoded:
    """Decode image bytes into the model's input (short side ``short_side``, sides multiples of ``multiple``) and
    the image's size; ``full`` also keeps the whole image (for overlays), decoded at full resolution.

    More than ``max_pixels`` pixels: TooLargeError, nothing decoded. Empty, truncated or corrupt bytes:
    ValueError with a short reason (as :func:`decode_image`)."""
    with own_pixel_bound():
        im = _opened(data, max_pixels)
        if im is not None:
            with im:
                decoded = None if full else _reduced(im, short_side, multiple)
            if decoded is not None:
                return decoded
        image = decode_image(data)
    check_pixels(image.width, image.height, max_pixels)
    h, w = input_size(image.height, image.width, short_side, multiple)
    inputs = np.asarray(image.resize((w, h), Image.BILINEAR))
    return Decoded(inputs, (image.height, image.width), np.asarray(image) if full else None)
