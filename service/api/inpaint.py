"""``POST /v1/inpaint``: complete an image where a mask says so, holding the known pixels during the descent.

The mask is prepared like the image (same crop, resized with nearest-neighbour to the model's size) after
a check that both have the same size. ``/v1/inpaint`` reads white = regenerate, black = keep; the
OpenAI-compatible ``images.edit`` reads its ``mask`` with OpenAI's convention (fully transparent = edit)
through the same ``prepare_mask``. The job carries the mask in its spec (packed bits, base64).
"""
from __future__ import annotations

import base64
import io
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image, ImageOps
from pydantic import ConfigDict, Field

from service.api.conventions import client_options
from service.api.denoise import IMAGE_DOC, decode_upload
from service.api.modelinfo import ModelInfo
from service.api.deps import ApiState, get_state, require_api_key
from service.api.generations import WAIT_DOC
from service.api.schemas import JobCreated, JobStatus, SamplingOptions, error_responses
from service.api.submit import (check_image_count, deadline, field_error, first_seed, resolve_labels,
                                sampler_spec, submit)
from service.api.uploads import LimitedBodyRoute, UploadError
from service.classnames import MAX_LABEL_CHARS
from service.jobstore import ImageSpec, JobSpec

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=LimitedBodyRoute, dependencies=[Depends(require_api_key)])

MASK_DOC = ("PNG (or JPEG/WebP) of the same size as the image: white = regenerate, black = keep (grey: >= 128 "
            "is white)")


class InpaintForm(SamplingOptions):
    """Form fields of ``POST /v1/inpaint`` (beside the ``image`` and ``mask`` files)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    label: str | None = Field(None, max_length=MAX_LABEL_CHARS,
                              description="class to complete towards (empty = unconditional)",
                              examples=["3"])


def prepare_mask(mask: bytes, image: bytes, size: int, convention: str = "white") -> np.ndarray:
    """The (size, size) bool mask (True = regenerate) of an upload, cropped and resized like its image.

    ``convention``: ``white`` (white = regenerate) or ``alpha`` (OpenAI: alpha 0 = edit). A mask of another
    size than the image, or an unreadable one, is an ``UploadError(422)`` saying so.
    """
    try:
        img_size = ImageOps.exif_transpose(Image.open(io.BytesIO(image))).size
        m = ImageOps.exif_transpose(Image.open(io.BytesIO(mask)))
        m.load()
    except Exception as exc:     # Pillow raises many types on bad bytes; each becomes one line
        raise UploadError(422, f"the mask is not a readable image ({type(exc).__name__})") from None
    if m.size != img_size:
        raise UploadError(422, f"the mask is {m.size[0]}x{m.size[1]} but the image is {img_size[0]}x{img_size[1]}; "
                               "send a mask of the image's size")
    if convention == "alpha":
        if "A" not in m.getbands() and "transparency" not in m.info:
            raise UploadError(422, "the mask has no alpha channel; make the pixels to edit fully transparent")
        regen = np.array(m.convert("RGBA"))[..., 3] == 0
    else:
        regen = np.array(m.convert("L")) >= 128
    width, height = m.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    regen = regen[top:top + side, left:left + side]
    if side != size:
        scaled = Image.fromarray(regen.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
        regen = np.array(scaled) >= 128
    if not regen.any():
        raise UploadError(422, "the mask marks nothing to regenerate; paint the region to complete "
                               + ("fully transparent" if convention == "alpha" else "white"))
    return regen


def pack_mask(regen: np.ndarray) -> str:
    """The spec form of a mask: base64 of ``np.packbits`` of its rows (``Engine._mask`` reads it)."""
    return base64.b64encode(np.packbits(regen.astype(np.uint8).ravel()).tobytes()).decode()


@router.post("/inpaint", status_code=202, response_model=JobCreated,
             summary="Inpaint: regenerate the masked part of an image (multipart form)",
             responses={200: {"model": JobStatus, "description": "with ?wait=true: the finished job"},
                        **error_responses(400, 401, 404, 413, 415, 422, 429, 503)})
async def create_inpaint(request: Request, form: Annotated[InpaintForm, Form()],
                         image: UploadFile = File(..., description=IMAGE_DOC),
                         mask: UploadFile = File(..., description=MASK_DOC),
                         wait: bool = Query(False, description=WAIT_DOC), state: ApiState = Depends(get_state),
                         inline: bool = Depends(client_options)):
    """An energy landscape is a prior: the descent holds the known (black) pixels and moves only the
    masked (white) ones, from noise, towards ``label`` if given. Pixel-space models keep the known pixels
    exactly; latent models hold the latent cells that lie wholly in the known part and paste the known
    pixels back after decoding."""
    model = state.pick_model(form.model)
    raw = await request.form()
    known = set(InpaintForm.model_fields) | {"image", "mask"}
    for name in raw.keys():
        if name not in known:
            raise field_error(("body", name), f"unknown form field {name!r}; the fields are: {', '.join(sorted(known))}")
    for part in ("image", "mask"):              # one of each: a second would be silently dropped
        if len(raw.getlist(part)) > 1:
            raise field_error(("body", part), f"send exactly one {part}")
    labels = resolve_labels([form.label], model, ("body", "label")) if form.label else []
    check_image_count(form.n, state, ("body", "n"), f"n = {form.n}")
    data, mask_data = await image.read(), await mask.read()
    png, regen = await prepare_inpaint_inputs(state, data, mask_data, "white", model)
    seed = first_seed(form)
    spec = JobSpec(kind="inpaint", model=model.name,
                   images=[ImageSpec(seed=seed + k, labels=list(labels)) for k in range(form.n)],
                   cfg_scale=model.defaults.guidance_scale if form.guidance_scale is None else form.guidance_scale,
                   sampler=sampler_spec(form, model), deadline=deadline(form, time.time()),
                   format=form.format, priority=form.priority, mask=pack_mask(regen))
    return await submit(request, state, spec, png, wait, options=form, inline=inline)


async def prepare_inpaint_inputs(state: ApiState, image: bytes, mask: bytes, convention: str,
                                 model: ModelInfo) -> tuple[bytes, np.ndarray]:
    """(model-sized PNG of the image, its regenerate mask); upload errors become 413/415/422 on the field."""
    limit = state.settings.max_upload_bytes
    for what, blob in (("image", image), ("mask", mask)):
        if len(blob) > limit:
            raise HTTPException(413, f"the {what} is {len(blob)} bytes, over the limit of {limit}; send a smaller one")
    try:
        png = await decode_upload(state, image, model)
    except UploadError as exc:
        if exc.status_code == 422:
            raise field_error(("body", "image"), exc.detail) from None
        raise HTTPException(exc.status_code, exc.detail) from None
    try:
        regen = await run_in_threadpool(prepare_mask, mask, image, model.image_size, convention)
    except UploadError as exc:
        raise field_error(("body", "mask"), exc.detail) from None
    return png, regen
