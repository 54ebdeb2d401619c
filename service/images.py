"""Image bytes <-> uint8 pixel arrays: PNG (default), JPEG and WebP out; PNG (or any Pillow format) in.

Pixel arrays are ``(H, W, C)`` uint8 with ``C`` = 1 (grey) or 3 (RGB), the layout codecs produce.
PNG output is lossless and deterministic, so the same pixels always give the same bytes.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.jobs import IMAGE_FORMATS

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageError(ValueError):
    """An upload could not be decoded or does not fit the model (one-line message)."""


def content_type(fmt: str) -> str:
    if fmt not in IMAGE_FORMATS:
        raise ImageError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, not {fmt!r}")
    return IMAGE_FORMATS[fmt]


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """One ``(H, W, C)`` uint8 array -> encoded bytes; 1 channel -> a grey image."""
    content_type(fmt)
    if pixels.ndim != 3 or pixels.dtype != np.uint8 or pixels.shape[-1] not in (1, 3):
        raise ImageError(f"expected uint8 pixels of shape (H, W, 1|3), got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
    else:
        image.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def decode_image(data: bytes, size: int, channels: int, max_pixels: int = 16_000_000) -> np.ndarray:
    """Encoded bytes -> ``(size, size, channels)`` uint8; the size must already be the model's."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"input image has {width * height} pixels, more than the limit {max_pixels}")
        if (width, height) != (size, size):
            raise ImageError(f"input image is {width}x{height}, the model works on {size}x{size}")
        image = image.convert("L" if channels == 1 else "RGB")
        pixels = np.array(image, dtype=np.uint8)      # a writable copy
    except ImageError:
        raise
    except Exception as exc:   # Pillow raises many types on bad bytes; each becomes one line
        raise ImageError(f"input is not a readable image ({type(exc).__name__}: {str(exc)[:120]})") from None
    return pixels[..., None] if channels == 1 else pixels
