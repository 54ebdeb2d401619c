"""``POST /v1/scores``: the energy score of uploaded images (EqM's gradient norm at the input).

The uploads are prepared like denoise inputs (cropped, resized, converted to the model's channels),
queued as one job of kind ``score`` and run by a worker in one batched forward
(``service.scoring``). The answer waits for the job (at most EQM_WAIT_TIMEOUT_S; a score job is
one forward, so it is normally done at once); a job still queued then answers 202 with its link,
and ``GET /v1/scores/{id}`` gives the result later.
"""
from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from service.api.conventions import absolute, reject_unknown_query
from service.api.deps import ApiState, get_state, require_api_key
from service.api.jobs import JobId
from service.api.listing import not_found, require_owner
from service.api.schemas import MAX_MODEL_CHARS, error_responses
from service.api.submit import check_image_count, enqueue, field_error, resolve_labels, wait_until_final
from service.api.uploads import PREPROCESSING, LimitedBodyRoute, UploadError, decode_upload, unreadable_form
from service.classnames import MAX_LABEL_CHARS
from service.jobstore import ImageSpec, JobSpec
from service.scoring import SCORE_KIND, score_input_key

router = APIRouter(prefix="/v1", tags=["scores"], route_class=LimitedBodyRoute,
                   dependencies=[Depends(require_api_key), Depends(reject_unknown_query)])

CALIBRATION_DOC = ("fraction of the model's held-out data (digits: the 20% test split) whose gradient norm is at "
                   "least this image's: ~1 typical of the data, ~0 farther from it than all of it; null when the "
                   "model has no calibration")


class ImageScore(BaseModel):
    index: int
    grad_norm: float = Field(description="||f(x, y)||_2 at the input: 0 at equilibrium, larger = farther from the data")
    energy: float | None = Field(None, description="EqM-E and Energy Matching models: the energy at the input "
                                 "(official sign, lower on data; the paper's OOD score); null for implicit models")
    score: Literal["grad_norm", "energy"] = Field("grad_norm", description="the score in_distribution calibrates: "
                                                  "energy where the model has one, else grad_norm")
    in_distribution: float | None = Field(None, ge=0, le=1, description=CALIBRATION_DOC)


class ScoreResult(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    model: str
    label: int | None = Field(None, description="the class the field was conditioned on (null = unconditional)")
    score: Literal["grad_norm", "energy"] = Field(description="which score ranks the images: the energy for EqM-E "
                                                  "models, the gradient norm for implicit ones")
    scores: list[ImageScore] = Field(description="one per uploaded image, in order (empty until done)")
    error: str | None = None
    url: str = Field(description="this result, to fetch it again")


def text_field(form, name: str, max_chars: int) -> str | None:
    """A text field of the form sent at most once, within the same length limit as on the other routes."""
    values = form.getlist(name)
    if len(values) > 1:
        raise field_error(("body", name), f"send {name} once, not {len(values)} times")
    if not values:
        return None
    if not isinstance(values[0], str):
        raise field_error(("body", name), f"{name} is a text field, not a file")
    if len(values[0]) > max_chars:
        raise field_error(("body", name), f"{name} is at most {max_chars} characters, not {len(values[0])}")
    return values[0]


def _result(request: Request, state: ApiState, job_id: str) -> tuple[ScoreResult, bool]:
    rec = state.store.get(job_id)
    if rec is None or rec["spec"]["kind"] != SCORE_KIND:
        raise not_found(job_id)
    labels = rec["spec"]["images"][0]["labels"] if rec["spec"]["images"] else []
    raw = state.redis.hget(state.store.keys.job(job_id), "scores")
    scores = [ImageScore(**s) for s in json.loads(raw)] if raw else []
    path = request.url_for("get_scores", job_id=job_id).path
    scored_by = state.models.get(rec["spec"]["model"])
    out = ScoreResult(id=job_id, status=rec["status"], model=rec["spec"]["model"], label=labels[0] if labels else None,
                      score="energy" if scored_by is not None and scored_by.has_energy else "grad_norm",
                      scores=scores, error=rec["error"], url=absolute(request, state.settings, path))
    return out, rec["status"] in ("done", "failed", "cancelled")


@router.post("/scores", response_model=ScoreResult, summary="Energy score of images (out-of-distribution)",
             responses={202: {"model": ScoreResult, "description": "still queued after the wait limit"},
                        **error_responses(400, 401, 404, 413, 415, 422, 429, 503)},
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["image"],
                 "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                          "description": "one or more images (repeat the field); " + PREPROCESSING},
                                "label": {"type": "string", "maxLength": MAX_LABEL_CHARS,
                                          "description": "score under this class's field (default: unconditional)"},
                                "model": {"type": "string", "maxLength": MAX_MODEL_CHARS}}}}}}})
async def create_scores(request: Request, state: ApiState = Depends(get_state)):
    """Per image: the gradient norm of the model's field at the image (one forward; conditional on
    ``label`` when given) and ``in_distribution``, that norm calibrated on the model's held-out data.
    EqM-E models also give the image's ``energy`` and rank (and calibrate) by it.
    Uniform noise or shuffled pixels score far lower than real digits (AUROC in bench/RESULTS.md)."""
    try:
        form = await request.form()
    except HTTPException:
        raise
    except Exception as exc:
        raise unreadable_form(exc) from None
    for name in form.keys():
        if name not in ("image", "label", "model"):
            raise field_error(("body", name), f"unknown form field {name!r}; the fields are: image, label, model")
    files = [f for f in form.getlist("image") if isinstance(f, UploadFile)]
    if not files:
        raise field_error(("body", "image"), "send at least one image file in the field 'image'")
    check_image_count(len(files), state, ("body", "image"), f"{len(files)} uploads")
    model_name, label_text = text_field(form, "model", MAX_MODEL_CHARS), text_field(form, "label", MAX_LABEL_CHARS)
    model = state.pick_model(model_name)
    labels = resolve_labels([label_text], model, ("body", "label")) if label_text else []
    inputs, keys = [], state.store.keys
    spec = JobSpec(kind=SCORE_KIND, model=model.name, images=[ImageSpec(seed=0, labels=list(labels)) for _ in files])
    for k, upload in enumerate(files):
        data = await upload.read()
        try:
            png = await decode_upload(state, data, model)
        except UploadError as exc:
            if exc.status_code == 422:
                raise field_error(("body", "image", k), exc.detail) from None
            raise HTTPException(exc.status_code, f"image {k}: {exc.detail}") from None
        inputs.append(png)
    extra = {score_input_key(keys.prefix, spec.id, k): png for k, png in enumerate(inputs)}
    job_id, _ = await enqueue(request, state, spec, None, inputs=extra)
    await wait_until_final(state, job_id, state.settings.wait_timeout_s)
    result, final = await run_in_threadpool(_result, request, state, job_id)
    return JSONResponse(result.model_dump(mode="json"), status_code=200 if final else 202,
                        headers={"Location": result.url})


@router.get("/scores/{job_id}", response_model=ScoreResult, summary="A score job's result",
            responses=error_responses(401, 404, 422), dependencies=[Depends(require_owner)])
def get_scores(request: Request, job_id: str = JobId, state: ApiState = Depends(get_state)) -> ScoreResult:
    return _result(request, state, job_id)[0]

