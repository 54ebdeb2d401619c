"""Request bodies: size limits enforced while the bytes arrive, and uploaded images made model-sized.

Size: a declared ``Content-Length`` over the limit is refused before a byte is read; otherwise the
body is counted chunk by chunk as the server receives it and refused (413) the moment it passes the
limit, so an oversized or endless (chunked) upload is never spooled to memory or disk.

Time: each chunk of a body must arrive within ``body_timeout_s`` of the previous one, and the whole body
within ``body_deadline_s`` of the headers (else 408 and the connection is closed).

Images (``prepare_image``), in this order, each step refusing before any pixel is decoded:
1. the first bytes must be PNG, JPEG or WebP (else 415);
2. the header's width x height must be within the pixel limit (else 413), ``upload_pixel_limit``: derived
   from the model's size and capped by ``max_upload_pixels``; decompression bombs (small files with
   huge dimensions) are refused before decoding. At most ``upload_decodes`` uploads are decoded at
   once per process (the others wait their turn), so decoding memory stays bounded under load;
3. decode the first frame, apply the EXIF orientation, flatten transparency onto black;
4. center-crop to a square (the shorter side), resize to the model's size with a Lanczos filter,
   convert to the model's channels (ITU-R 601-2 luma for grey models, RGB otherwise);
5. store as PNG (lossless), the form the workers read from ``P:job:<id>:input``.
"""
from __future__ import annotations

import asyncio
import io
import time
import warnings
from typing import Callable

from fastapi import HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.types import Message, Receive

from service.api.deps import check_api_key

JSON_BODY_LIMIT = 64 * 1024           # generation / composition requests are a few hundred bytes
FORM_OVERHEAD = 64 * 1024             # multipart boundaries, part headers and the other form fields
PREPROCESSING = ("center-crop to a square (the shorter side), resize with a Lanczos filter to the model's size, "
                 "convert to the model's channels (grey: ITU-R 601-2 luma); transparency is flattened onto black; "
                 "the EXIF orientation is applied; animated images use their first frame")

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class UploadError(Exception):
    """An upload the API refuses: HTTP status and a one-line reason."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def sniff_format(head: bytes) -> str | None:
    """The image format from its magic bytes (the client's declared content type is not trusted)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def prepare_image(data: bytes, size: int, channels: int, max_pixels: int) -> bytes:
    """Uploaded bytes -> PNG of ``size x size`` with ``channels`` channels; ``UploadError`` if refused."""
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise UploadError(415, "the upload is not a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])    # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(413, f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                                       f"{max_pixels}; downscale it first")
            if width < 1 or height < 1:
                raise UploadError(422, f"the image is {width}x{height}: it has no pixels")
            image.seek(0)
            if fmt == "jpeg":
                image.draft(image.mode, (size, size))     # DCT scaling: decode smaller, still >= size per side
            image = ImageOps.exif_transpose(image)  # decodes
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(413, f"the image is too large to decode ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(422, f"the {fmt.upper()} data is corrupt or truncated ({type(exc).__name__})") from None
    return _to_model_png(image, size, channels)


def _to_model_png(image: Image.Image, size: int, channels: int) -> bytes:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


DECODE_WAIT_S = 30.0          # an upload waits this long for a decoding turn before a 503


async def decode_upload(state, data: bytes, model) -> bytes:
    """The one way every route decodes an upload: ``prepare_image`` with the model's pixel limit
    (``upload_pixel_limit``) of the request's model in the thread pool, at most ``upload_decodes`` at once per process: each decode
    may take ~180 MB, so a burst of large uploads waits its turn instead of taking the memory."""
    try:
        await asyncio.wait_for(state.decodes.acquire(), DECODE_WAIT_S)
    except asyncio.TimeoutError:
        raise HTTPException(503, f"busy decoding other uploads for {DECODE_WAIT_S:.0f}s; retry shortly",
                            headers={"Retry-After": "5"}) from None
    try:
        return await run_in_threadpool(prepare_image, data, model.image_size, model.channels,
                                       upload_pixel_limit(model.image_size, state.settings.max_upload_pixels))
    finally:
        state.decodes.release()


# -- body size --------------------------------------------------------------------------------

def body_limit(request: Request) -> int:
    """Most bytes a request to this route may send: uploads get the image limit plus form overhead."""
    settings = request.app.state.api.settings
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return settings.max_upload_bytes + FORM_OVERHEAD
    return JSON_BODY_LIMIT


def unreadable_form(exc: Exception) -> HTTPException:
    """400 for a multipart body the parser refused, with the parser's reason."""
    inner = exc.__cause__ or exc.__context__          # Starlette wraps the parser's own message
    text = str(inner) if inner is not None and str(inner) else str(getattr(exc, "detail", "") or exc)
    reason = text.splitlines()[0] if text else type(exc).__name__
    return HTTPException(400, f"the body is not a readable multipart form ({reason}); send multipart/form-data "
                              f"with the image in the field 'image'")


def too_large(limit: int) -> HTTPException:
    if limit == JSON_BODY_LIMIT:              # a JSON request: a fixed cap, no setting raises it
        return HTTPException(413, f"the JSON body is over {limit} bytes; a request is a few hundred bytes: "
                                  f"send images as a multipart upload")
    return HTTPException(413, f"request body is over the limit of {limit} bytes; send a smaller image "
                              f"(EQM_MAX_UPLOAD_BYTES on the server)")


def upload_pixel_limit(image_size: int, max_pixels: int) -> int:
    """Most pixels an upload may have: ``(16 x the model's size)^2``, at least 1024 x 1024, at most
    ``EQM_MAX_UPLOAD_PIXELS``. Everything is resized to the model's size, so more detail is wasted while
    decoding costs ~10 bytes per pixel (a 16 M pixel RGBA PNG takes ~180 MB to decode and flatten):
    8x8 digits -> 1 M pixels, 256 x 256 EqM-XL/2 -> 16 M."""
    return min(max_pixels, max(1024 * 1024, (16 * image_size) ** 2))


def _counting_receive(receive: Receive, limit: int, timeout_s: float, deadline_s: float) -> Callable[[], Message]:
    seen = 0
    deadline = time.monotonic() + deadline_s

    async def counted() -> Message:
        nonlocal seen
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, min(timeout_s, left)))
        except asyncio.TimeoutError:
            if left <= timeout_s:
                why = f"the request body did not arrive whole within {deadline_s:.0f}s (EQM_BODY_DEADLINE_S)"
            else:
                why = f"the request body stopped arriving for {timeout_s:.0f}s (EQM_BODY_TIMEOUT_S)"
            raise HTTPException(408, f"{why}; send it at once", headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return counted


class LimitedBodyRoute(APIRoute):
    """An ``APIRoute`` that checks the API key, then refuses oversized bodies before and while reading them."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            check_api_key(request)                 # before any of the body is read
            if request.method in ("POST", "PUT", "PATCH"):
                limit = body_limit(request)
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise too_large(limit)
                settings = request.app.state.api.settings
                request = Request(request.scope, _counting_receive(request.receive, limit, settings.body_timeout_s,
                                                                   settings.body_deadline_s))
            return await handler(request)

        return limited
