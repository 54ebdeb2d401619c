"""Inpainting with any energy landscape: hold the known entries of the iterate, descend on the rest.

A mask is an (H, W) bool array over the image's pixels, True = regenerate. On the latent grid it
becomes ``keep`` (1, h, w) float: 1 where a latent cell is held at the encoded image's value. Pixel-space
models (identity codec) hold exactly the known pixels. Latent models hold a cell only if every pixel it
covers is known (a cell touching the region to regenerate is free to move), and the known pixels are
composited back after decoding (``composite``), so they come back exact in the final image too.
Family-agnostic: the sampler applies the hold after every update, whatever computed the direction.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class MaskError(ValueError):
    """A mask that cannot be used with the image (one-line message)."""


def latent_hold(codec, pixels: np.ndarray, regenerate: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(known latent (C, h, w) float32, keep (1, h, w) float32) of one (H, W, C) uint8 image and its mask."""
    if regenerate.shape != pixels.shape[:2]:
        raise MaskError(f"the mask is {regenerate.shape[1]}x{regenerate.shape[0]}, the image is "
                        f"{pixels.shape[1]}x{pixels.shape[0]}; give a mask of the image's size")
    known = codec.encode(pixels[None])[0].float().cpu()                            # (C, h, w)
    regen = torch.from_numpy(regenerate.astype(np.float32))[None, None]            # (1, 1, H, W)
    factor = pixels.shape[0] // known.shape[-1]
    if factor > 1:
        regen = F.max_pool2d(regen, factor)          # a cell is free if any pixel of it is regenerated
    return known, (1.0 - regen[0]).clamp(0, 1)


def composite(generated: np.ndarray, original: np.ndarray, regenerate: np.ndarray) -> np.ndarray:
    """The generated pixels where the mask says regenerate, the original ones elsewhere ((H, W, C) uint8)."""
    return np.where(regenerate[..., None], generated, original).astype(np.uint8)


def mask_from_png(data: bytes, size: int, convention: str = "white") -> np.ndarray:
    """An (size, size) bool mask (True = regenerate) from image bytes.

    ``white``: white (luminance >= 128) = regenerate, black = keep (the ``/v1/inpaint`` convention).
    ``alpha``: OpenAI's ``images.edit``: fully transparent pixels are edited; an image with no alpha
    channel has nothing transparent, so nothing to edit (an error says so).
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:     # Pillow raises many types on bad bytes; each becomes one line
        raise MaskError(f"the mask is not a readable image ({type(exc).__name__})") from None
    if image.size != (size, size):
        raise MaskError(f"the mask is {image.size[0]}x{image.size[1]}, the image is {size}x{size}; "
                        "give a mask of the image's size")
    if convention == "alpha":
        if "A" not in image.getbands() and "transparency" not in image.info:
            raise MaskError("the mask has no alpha channel; make the pixels to edit fully transparent (alpha 0)")
        alpha = np.array(image.convert("RGBA"))[..., 3]
        return alpha == 0
    return np.array(image.convert("L")) >= 128
