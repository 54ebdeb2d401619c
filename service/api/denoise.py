"""``POST /v1/denoise``: start the descent from an uploaded (partially noised) image instead of noise."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile

from service.api.conventions import client_options
from service.api.deps import ApiState, get_state, require_api_key
from service.api.generations import WAIT_DOC
from service.api.schemas import DenoiseForm, JobCreated, JobStatus, error_responses
from service.api.submit import (check_image_count, deadline, field_error, first_seed, resolve_labels,
                                sampler_spec, submit)
from service.api.uploads import PREPROCESSING, LimitedBodyRoute, UploadError, decode_upload
from service.jobstore import ImageSpec, JobSpec

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=LimitedBodyRoute, dependencies=[Depends(require_api_key)])

IMAGE_DOC = ("PNG, JPEG or WebP (detected from its bytes). At most EQM_MAX_UPLOAD_BYTES bytes and "
             "(16 x the model's image size)^2 pixels (at least 1024 x 1024, at most EQM_MAX_UPLOAD_PIXELS). "
             "Preprocessing: " + PREPROCESSING + ".")
@router.post("/denoise", status_code=202, response_model=JobCreated,
             summary="Denoise an uploaded image (multipart form)",
             responses={200: {"model": JobStatus, "description": "with ?wait=true: the finished job"},
                        **error_responses(400, 401, 404, 413, 415, 422, 429, 503)})
async def create_denoise(request: Request, form: Annotated[DenoiseForm, Form()],
                         image: UploadFile = File(..., description=IMAGE_DOC),
                         wait: bool = Query(False, description=WAIT_DOC), state: ApiState = Depends(get_state),
                         inline: bool = Depends(client_options)):
    """EqM's field is time-invariant, so a partially noised image is a valid starting point: the descent
    runs from it (optionally after mixing in more noise, ``noise_level``). ``n`` > 1 gives variants with
    different noise seeds. The prepared input is stored as PNG beside the job."""
    model = state.pick_model(form.model)
    raw = await request.form()              # already parsed by FastAPI: cached on the request
    known = set(DenoiseForm.model_fields) | {"image"}
    for name in raw.keys():
        if name not in known:
            raise field_error(("body", name), f"unknown form field {name!r}; the fields are: {', '.join(sorted(known))}")
    if len(raw.getlist("image")) > 1:
        raise field_error(("body", "image"), "send exactly one image")
    labels = resolve_labels([form.label], model, ("body", "label")) if form.label else []
    check_image_count(form.n, state, ("body", "n"), f"n = {form.n}")
    limit = state.settings.max_upload_bytes
    if image.size is not None and image.size > limit:
        raise HTTPException(413, f"the image is {image.size} bytes, over the limit of {limit}; send a smaller image")
    data = await image.read()
    try:
        png = await decode_upload(state, data, model)
    except UploadError as exc:
        if exc.status_code == 422:
            raise field_error(("body", "image"), exc.detail) from None
        raise HTTPException(exc.status_code, exc.detail) from None
    seed = first_seed(form)
    spec = JobSpec(kind="denoise", model=model.name,
                   images=[ImageSpec(seed=seed + k, labels=list(labels)) for k in range(form.n)],
                   cfg_scale=model.defaults.guidance_scale if form.guidance_scale is None else form.guidance_scale,
                   sampler=sampler_spec(form, model, denoise=True), deadline=deadline(form, time.time()),
                   format=form.format, noise_level=form.noise_level, priority=form.priority)
    return await submit(request, state, spec, png, wait, options=form, inline=inline)
