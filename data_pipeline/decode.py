"""Image bytes -> R x R uint8 RGB: decode, normalise the colour mode, resize the short side, centre-crop.

Every failure is a ``SkipImage`` with a short reason code (counted in the manifest) and the
decoder's message. Conversions: grayscale, bilevel, palette, CMYK and YCbCr become RGB;
transparency (RGBA, LA, PA, palette with a transparent colour) is composited over white;
16-bit grayscale keeps its high byte. Modes that carry no display colours (32-bit integer,
float) are skipped as ``unsupported-mode``.
"""
from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = Image.Resampling.BICUBIC  # antialiased when downscaling
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "RGBX", "P"}


class SkipImage(Exception):
    """An input that cannot become an RGB image; ``reason`` is a short code for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in _DIRECT_MODES:
        return im.convert("RGB")
    if mode.startswith("I;16"):
        high = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high, "L").convert("RGB")
    raise SkipImage("unsupported-mode", f"image mode {mode}")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _fast_jpeg(data: bytes) -> Image.Image | None:
    """8-bit 3-component JPEGs straight into Pillow's libjpeg decoder, skipping its Python marker parser.

    Same decoder, same arguments as ``Image.open(...).load()``, so the pixels are identical (tested);
    anything unusual (other component counts, errors, truncation, more pixels than ``Image.MAX_IMAGE_PIXELS``)
    returns None for the full path, before anything is allocated.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 10 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in _SOF:
            precision, h, w, comps = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
            if precision != 8 or comps != 3 or not w or not h or w * h > (Image.MAX_IMAGE_PIXELS or w * h):
                return None  # a size past Pillow's limit: the full path refuses it as too-large, unallocated
            im = Image.new("RGB", (w, h))
            decoder = Image._getdecoder("RGB", "jpeg", ("RGB", ""), ())
            try:
                decoder.setimage(im.im, (0, 0, w, h))
                consumed, err = decoder.decode(data)
            finally:
                decoder.cleanup()
            return im if consumed < 0 and err >= 0 else None
        if marker == 0xFF:
            pos += 1
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully into an RGB PIL image, or raise SkipImage."""
    if not data:
        raise SkipImage("empty-file", "zero bytes")
    try:
        fast = _fast_jpeg(data)
    except Exception:  # noqa: BLE001 - any trouble: the full path below classifies it
        fast = None
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
    except UnidentifiedImageError as e:
        raise SkipImage("not-an-image", str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage("too-large", str(e)) from None
    except OSError as e:
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise SkipImage(reason, str(e)) from None
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise SkipImage("corrupt", f"{type(e).__name__}: {e}") from None
    if im.width < 1 or im.height < 1:
        raise SkipImage("corrupt", f"image size {im.size}")
    return _to_rgb(im)


def resize_crop(im: Image.Image, resolution: int) -> np.ndarray:
    """Resize the short side to ``resolution`` and centre-crop: (R, R, 3) uint8 in one resampling."""
    w, h = im.size
    if (w, h) != (resolution, resolution):
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        im = im.resize((resolution, resolution), RESAMPLE, box=(left, top, left + side, top + side))
    return np.asarray(im)


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Image bytes -> (R, R, 3) uint8 RGB, or raise SkipImage."""
    return resize_crop(open_rgb(data), resolution)
