"""OpenAI-compatible images API: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

What OpenAI's clients send maps onto EqM jobs:

- ``prompt`` is a class (index, name, WordNet id or synonym: the model's label resolver) or a
  composition ``"A + B"`` / ``"A + B + C"``; ``revised_prompt`` in the answer names the class(es) used.
- ``n`` images, ``size`` must be the model's (``"8x8"`` for digits, ``"256x256"`` for EqM-XL/2; ``auto``
  too), ``response_format`` ``b64_json`` (default) or ``url`` (absolute links to the job's images),
  ``output_format`` ``png`` | ``jpeg`` | ``webp``, ``model``, ``user`` (accepted, not stored).
- EqM's own options ride along as extra fields (``seed``, ``guidance_scale``, ``sampler``, ``step_size``,
  ``mu``, ``max_steps``, ``grad_norm_threshold``, ``deadline_s``, ``priority``, ``weights``; edits also
  ``noise_level``).
- ``edits`` takes the multipart ``image`` (or ``image[]``, one image) and denoises it towards the prompt's
  class, exactly ``POST /v1/denoise``; a ``mask`` is refused (EqM descends the whole image).

Both answer synchronously, like OpenAI's, waiting at most ``EQM_WAIT_TIMEOUT_S``; a job not finished by
then answers 202 with no images and the job's ``id`` and ``url`` (not a 5xx, which OpenAI's clients would
retry, queuing the same images again). Native options such as ``webhook`` work here too.
Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and its status codes (a
bad field is a 400). ``Idempotency-Key`` works here too: a repeated request returns the original images.
"""
from __future__ import annotations

import base64
import time
from typing import Callable, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.deps import ApiState, UnknownModel, get_state, require_api_key
from service.api.inpaint import pack_mask, prepare_inpaint_inputs
from service.api.modelinfo import ModelInfo
from service.api.schemas import MAX_COMPOSITION_LABELS, SamplingOptions
from service.api.conventions import absolute, reject_unknown_query
from service.api.submit import (check_image_count, deadline, enqueue, field_error, first_seed,
                                resolve_labels, sampler_spec, wait_until_final)
from service.api.errors import validation_message
from service.api.uploads import LimitedBodyRoute, UploadError, decode_upload, unreadable_form
from service.jobstore import ImageSpec, JobSpec

_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error"}
PENDING_DOC = ("not finished within EQM_WAIT_TIMEOUT_S: no images yet (data is empty); the job's id and url (also "
               "in Location) to fetch them later")


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(None, examples=["prompt"])
    code: str | None = Field(None, examples=["invalid_value"])


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


def openai_errors(*codes: int) -> dict:
    return {code: {"model": OpenAIError, "description": f"an error in OpenAI's shape ({_ERROR_TYPE[code]})"}
            for code in codes}


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None, error_type: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type or _ERROR_TYPE.get(status, "invalid_request_error"),
                      "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIRoute(LimitedBodyRoute):
    """Every error of these routes (auth, size limits, validation) in OpenAI's error shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def openai_shaped(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                if errors and errors[0].get("type") == "json_invalid":
                    return _error(400, "the body is not valid JSON", None, "invalid_json")
                message, param = validation_message(request, errors)
                return _error(400, message.removeprefix("body."), param, "invalid_value")
            except UnknownModel as exc:                  # OpenAI's own answer to a model it does not have
                return _error(404, str(exc.detail), "model", "model_not_found", error_type="invalid_request_error")
            except StarletteHTTPException as exc:        # FastAPI's HTTPException and Starlette's own (body errors)
                return _error(exc.status_code, str(exc.detail), headers=exc.headers)
        return openai_shaped


router = APIRouter(prefix="/v1/images", tags=["openai"], route_class=OpenAIRoute,
                   dependencies=[Depends(require_api_key), Depends(reject_unknown_query)])


class ImageGenerationRequest(SamplingOptions):
    """OpenAI's ``images.generate`` body, plus EqM's options as extra fields."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "3", "n": 2, "size": "8x8", "response_format": "b64_json"},
        {"prompt": "3 + 8", "n": 1, "response_format": "url", "seed": 0, "max_steps": 60},
    ]})

    prompt: str = Field(..., min_length=1, max_length=1000, description="a class (index, name, WordNet id or "
                        "synonym), or 'A + B' (up to 7 classes) for a composition", examples=["3"])
    size: str | None = Field(None, max_length=20, description="WIDTHxHEIGHT; must be the model's size (or 'auto')",
                             examples=["8x8"])
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json (default) or url")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="image encoding (default png)")
    user: str | None = Field(None, max_length=256, description="an end-user id (accepted, not stored)")
    quality: str | None = Field(None, max_length=20, description="accepted for compatibility; EqM's quality "
                                "knobs are max_steps and grad_norm_threshold")
    style: str | None = Field(None, max_length=20, description="accepted for compatibility, ignored")
    weights: list[float] | None = Field(None, max_length=MAX_COMPOSITION_LABELS,
                                        description="composition weights, one per class of the prompt")


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(None, description="the class(es) the prompt resolved to")


class ImagesResponse(BaseModel):
    created: int = Field(description="unix seconds")
    data: list[OpenAIImage]
    output_format: str | None = None
    size: str | None = None
    id: str | None = Field(None, description="202 only: the job, still running after EQM_WAIT_TIMEOUT_S")
    status: str | None = Field(None, description="202 only: the job's status")
    url: str | None = Field(None, description="202 only: the job's status URL (also in Location); its images "
                            "are downloadable from there once done")


def _split_prompt(prompt: str) -> list[str]:
    parts = [p.strip() for p in prompt.split("+")]
    if any(not p for p in parts):
        raise field_error(("body", "prompt"), "a composition is 'A + B' with a class on each side of every '+'")
    if len(parts) > MAX_COMPOSITION_LABELS:
        raise field_error(("body", "prompt"), f"at most {MAX_COMPOSITION_LABELS} classes can be composed")
    return parts


def _check_size(size: str | None, model: ModelInfo) -> None:
    want = f"{model.image_size}x{model.image_size}"
    if size not in (None, "auto", want):
        raise field_error(("body", "size"), f"size {size!r} is not served: this model makes {want} images")


def _revised(labels: list[int], model: ModelInfo) -> str:
    if not labels:
        return "unconditional"
    names = model.classes.names
    words = [f"{names[y]} (class {y})" if y < len(names) and names[y] else f"class {y}" for y in labels]
    return " + ".join(words)


def _build_spec(body: SamplingOptions, prompt: str, model: ModelInfo, state: ApiState, kind_single: str,
                weights: list[float] | None = None) -> tuple[JobSpec, list[int]]:
    # An unconditional model (no classes) takes any prompt text and ignores it.
    labels = resolve_labels(_split_prompt(prompt), model, ("body", "prompt")) if model.num_classes else []
    if weights is not None and len(weights) != len(labels):
        raise field_error(("body", "weights"), f"{len(weights)} weights given for {len(labels)} classes")
    check_image_count(body.n, state, ("body", "n"), f"n = {body.n}")
    composed = len(labels) > 1
    d = model.defaults
    scale = body.guidance_scale if body.guidance_scale is not None else (
        d.composition_guidance_scale if composed else d.guidance_scale)
    seed = first_seed(body)
    kind = "compose" if composed and kind_single == "generate" else kind_single
    spec = JobSpec(kind=kind, model=model.name,
                   images=[ImageSpec(seed=seed + k, labels=list(labels), weights=weights) for k in range(body.n)],
                   cfg_scale=scale, sampler=sampler_spec(body, model, denoise=kind_single == "denoise"),
                   deadline=deadline(body, time.time()), format=body.format, priority=body.priority)
    return spec, labels


async def _run(request: Request, state: ApiState, spec: JobSpec, input_png: bytes | None, labels: list[int],
               response_format: str, options: SamplingOptions) -> JSONResponse:
    """Queue the job, wait for it, answer in OpenAI's shape."""
    job_id, _ = await enqueue(request, state, spec, input_png, options=options)   # Idempotency-Key: the original job
    if not await wait_until_final(state, job_id, state.settings.wait_timeout_s):
        # Not a 5xx: OpenAI's clients retry those, which would queue the same images again.
        url = absolute(request, state.settings, request.url_for("get_job", job_id=job_id).path)
        status = await state.aredis.hget(state.store.keys.job(job_id), "status")
        pending = ImagesResponse(created=int(spec.submitted), data=[], id=job_id,
                                 status=status.decode() if status else "expired", url=url)
        return JSONResponse(pending.model_dump(mode="json", exclude_none=True), status_code=202,
                            headers={"Location": url, "Retry-After": "5", "X-EqM-Job-Id": job_id})
    rec = await run_in_threadpool(state.store.get, job_id)
    if rec is None or rec["status"] != "done":
        status = rec["status"] if rec else "expired"
        why = f": {rec['error']}" if rec and rec.get("error") else ""
        return _error(503, f"the job {job_id} ended {status}{why}", code=f"job_{status}")
    model = state.models[spec.model]
    revised = _revised(labels, model)
    data = []
    for k in range(len(rec["spec"]["images"])):
        if response_format == "url":
            path = request.url_for("get_image", job_id=job_id, index=k).path
            data.append(OpenAIImage(url=absolute(request, state.settings, path), revised_prompt=revised))
        else:
            raw = await state.aredis.get(state.store.keys.image(job_id, k))
            data.append(OpenAIImage(b64_json=base64.b64encode(raw).decode() if raw else None, revised_prompt=revised))
    size = f"{model.image_size}x{model.image_size}"
    body = ImagesResponse(created=int(rec["created"] or time.time()), data=data, output_format=rec["spec"]["format"],
                          size=size)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), headers={"X-EqM-Job-Id": job_id})


@router.post("/generations", response_model=ImagesResponse, summary="Create images (OpenAI-compatible)",
             responses={202: {"model": ImagesResponse, "description": PENDING_DOC},
                        **openai_errors(400, 401, 404, 413, 429, 503)})
async def images_generations(body: ImageGenerationRequest, request: Request, state: ApiState = Depends(get_state)):
    """``prompt`` names a class ("3", "golden retriever", "n02099601") or composes classes ("3 + 8").
    Waits for the images (at most EQM_WAIT_TIMEOUT_S) and returns them as base64 or URLs."""
    model = state.pick_model(body.model)
    _check_size(body.size, model)
    if body.output_format is not None:
        body = body.model_copy(update={"format": body.output_format})
    spec, labels = _build_spec(body, body.prompt, model, state, "generate", body.weights)
    return await _run(request, state, spec, None, labels, body.response_format or "b64_json", body)


class ImageEditForm(SamplingOptions):
    """Form fields of ``images.edit`` besides the image: OpenAI's, plus EqM's options."""

    model_config = ConfigDict(extra="ignore", strict=False)

    prompt: str = Field(..., min_length=1, max_length=1000, description="the class to denoise towards ('A + B' "
                        "composes)")
    size: str | None = Field(None, max_length=20)
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    user: str | None = Field(None, max_length=256)
    quality: str | None = Field(None, max_length=20)
    noise_level: float | None = Field(None, ge=0, le=1, description="g in g*image + (1-g)*noise before the descent")


_EDIT_FIELDS = set(ImageEditForm.model_fields) | {"image", "image[]", "mask"}


@router.post("/edits", response_model=ImagesResponse, summary="Edit (denoise) an image (OpenAI-compatible)",
             responses={202: {"model": ImagesResponse, "description": PENDING_DOC},
                        **openai_errors(400, 401, 404, 413, 415, 429, 503)},
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["image", "prompt"],
                 "properties": {"image": {"type": "string", "format": "binary"},
                                "prompt": {"type": "string", "minLength": 1, "maxLength": 1000},
                                "n": {"type": "integer", "minimum": 1},
                                "size": {"type": "string", "maxLength": 20},
                                "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                                "mask": {"type": "string", "format": "binary"},
                                "noise_level": {"type": "number", "minimum": 0, "maximum": 1},
                                "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                                "max_steps": {"type": "integer", "minimum": 1, "maximum": 1000}}}}}}})
async def images_edits(request: Request, state: ApiState = Depends(get_state)):
    """The image is prepared like ``/v1/denoise`` (cropped, resized, converted) and the descent starts
    from it (after mixing in ``noise_level`` noise when given) towards the prompt's class. With a ``mask``
    (OpenAI's convention: its fully transparent pixels are edited) it inpaints, as ``/v1/inpaint`` does."""
    try:
        form = await request.form()
    except HTTPException:
        raise
    except Exception as exc:        # malformed multipart
        raise unreadable_form(exc) from None
    for name in form.keys():
        if name not in _EDIT_FIELDS:
            raise field_error(("body", name), f"unknown form field {name!r}")
    files = [v for v in form.getlist("image") + form.getlist("image[]") if isinstance(v, UploadFile)]
    if len(files) != 1:
        raise field_error(("body", "image"), "send exactly one image file")
    fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    try:
        opts = ImageEditForm(**fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    model = state.pick_model(opts.model)
    _check_size(opts.size, model)
    if opts.output_format is not None:
        opts = opts.model_copy(update={"format": opts.output_format})
    data = await files[0].read()
    masks = [v for v in form.getlist("mask") if isinstance(v, UploadFile)]
    if masks or "mask" in form:
        # OpenAI's convention: the mask's fully transparent pixels are the ones to edit (inpainting).
        if len(masks) != 1:
            raise field_error(("body", "mask"), "send exactly one mask file (a PNG whose transparent pixels are edited)")
        png, regen = await prepare_inpaint_inputs(state, data, await masks[0].read(), "alpha", model)
        spec, labels = _build_spec(opts, opts.prompt, model, state, "inpaint")
        spec.kind, spec.mask = "inpaint", pack_mask(regen)
        return await _run(request, state, spec, png, labels, opts.response_format or "b64_json", opts)
    try:
        png = await decode_upload(state, data, model)
    except UploadError as exc:
        if exc.status_code == 422:
            raise field_error(("body", "image"), exc.detail) from None
        raise HTTPException(exc.status_code, exc.detail) from None
    spec, labels = _build_spec(opts, opts.prompt, model, state, "denoise")
    spec.noise_level = opts.noise_level
    return await _run(request, state, spec, png, labels, opts.response_format or "b64_json", opts)
