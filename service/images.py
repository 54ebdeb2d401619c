"""Image bytes <-> uint8 pixel arrays: PNG (default), JPEG and WebP out; PNG (or any Pillow format) in.

Pixel arrays are ``(H, W, C)`` uint8 with ``C`` = 1 (grey) or 3 (RGB), the layout codecs produce.
PNG output is lossless and deterministic, so the same pixels always give the same bytes.

Provenance: every PNG the service makes carries how it was made in two ``tEXt`` chunks:
``eqm-parameters`` (JSON: model, kind, labels, weights, seed, guidance scale, sampler settings, steps
taken, final gradient norm, ...; ``read_provenance`` returns it, ``eqm sample --from-png`` reruns it)
and ``parameters``, the same in one line of text, where image tools (A1111 style) show it.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, PngImagePlugin

from service.jobstore import IMAGE_FORMATS

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PROVENANCE_KEY = "eqm-parameters"
PROVENANCE_VERSION = 1


class ImageError(ValueError):
    """An upload could not be decoded or does not fit the model (one-line message)."""


def content_type(fmt: str) -> str:
    if fmt not in IMAGE_FORMATS:
        raise ImageError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, not {fmt!r}")
    return IMAGE_FORMATS[fmt]


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 95, provenance: dict | None = None) -> bytes:
    """One ``(H, W, C)`` uint8 array -> encoded bytes; 1 channel -> a grey image. ``provenance`` goes into
    PNG text chunks (other formats are written without it)."""
    content_type(fmt)
    if pixels.ndim != 3 or pixels.dtype != np.uint8 or pixels.shape[-1] not in (1, 3):
        raise ImageError(f"expected uint8 pixels of shape (H, W, 1|3), got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    buf = io.BytesIO()
    if fmt == "png":
        info = None
        if provenance is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True, separators=(",", ":")))
            info.add_text("parameters", provenance_line(provenance))
        image.save(buf, format="PNG", optimize=False, pnginfo=info)
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


def provenance_record(spec, index: int, steps: int, grad_norm: float | None, energy: float | None = None) -> dict:
    """What a PNG records about image ``index`` of a job (``spec``: a ``service.jobstore.JobSpec``)."""
    image = spec.images[index]
    sampler = spec.sampler
    # No job id and a rounded norm: the same request and seed still give byte-identical PNGs.
    return {"version": PROVENANCE_VERSION, "model": spec.model, "kind": spec.kind, "index": index,
            "labels": list(image.labels), "weights": list(image.weights) if image.weights is not None else None,
            "seed": image.seed, "guidance_scale": spec.cfg_scale, "noise_level": spec.noise_level,
            "sampler": sampler.sampler, "step_size": sampler.step_size, "mu": sampler.mu,
            "max_steps": sampler.max_steps, "grad_norm_threshold": sampler.grad_norm_threshold,
            "steps": steps, "grad_norm": None if grad_norm is None else float(f"{grad_norm:.4g}"),
            "compose_mode": getattr(spec, "compose_mode", "guided"),
            "energy": None if energy is None else float(f"{energy:.6g}"),
            **({"epsilon_max": sampler.epsilon_max, "time_cutoff": sampler.time_cutoff}
               if sampler.sampler == "heun-sde" else {})}


def provenance_line(p: dict) -> str:
    labels = "+".join(str(y) for y in p["labels"]) or "unconditional"
    weights = f", weights: {p['weights']}" if p.get("weights") else ""
    norm = "n/a" if p.get("grad_norm") is None else f"{p['grad_norm']:.4g}"
    return (f"EqM {p['kind']} of {labels}{weights}; model: {p['model']}, seed: {p['seed']}, "
            f"guidance: {p['guidance_scale']:g}, sampler: {p['sampler']}, step size: {p['step_size']:g}, "
            f"mu: {p['mu']:g}, max steps: {p['max_steps']}, threshold: {p['grad_norm_threshold']:g}, "
            f"steps: {p['steps']}, final grad norm: {norm}"
            + (f", energy: {p['energy']:.6g}" if p.get("energy") is not None else ""))


def read_provenance(data: bytes) -> dict | None:
    """The ``eqm-parameters`` record of a PNG, or None when it has none; ``ImageError`` if unreadable."""
    try:
        image = Image.open(io.BytesIO(data))
        text = getattr(image, "text", {}) or {}
    except Exception as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__})") from None
    raw = text.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ImageError(f"the {PROVENANCE_KEY} text of the PNG is not JSON") from None
