"""``POST /v1/generations``: class-conditional or unconditional images from noise."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request

from service.api.conventions import client_options
from service.api.deps import ApiState, get_state, require_api_key
from service.api.schemas import GenerationRequest, JobCreated, JobStatus, error_responses
from service.api.submit import (check_image_count, deadline, first_seed, resolve_labels, sampler_spec,
                                submit)
from service.api.uploads import LimitedBodyRoute
from service.jobstore import ImageSpec, JobSpec

WAIT_DOC = ("wait for the job (at most the server's EQM_WAIT_TIMEOUT_S seconds): 200 with the finished job, "
            "or 202 with its status if it is still running then")

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=LimitedBodyRoute, dependencies=[Depends(require_api_key)])


@router.post("/generations", status_code=202, response_model=JobCreated,
             summary="Generate images of classes (or unconditionally)",
             responses={200: {"model": JobStatus, "description": "with ?wait=true: the finished job"},
                        **error_responses(400, 401, 404, 413, 422, 429, 503)})
async def create_generation(body: GenerationRequest, request: Request, wait: bool = Query(False, description=WAIT_DOC),
                            state: ApiState = Depends(get_state),
                            inline: bool = Depends(client_options)):
    """Queue a job of ``n`` images per label (labels ``[3, 7]`` with ``n = 2`` -> images 3, 3, 7, 7, seeds
    ``seed .. seed+3``). Answers 202 with the job's links; follow ``links.events`` for progress."""
    model = state.pick_model(body.model)
    labels = resolve_labels(body.labels, model, ("body", "labels"))
    check_image_count(max(1, len(labels)) * body.n, state, ("body", "n"), f"{max(1, len(labels))} label(s) x n = {body.n}")
    per_image = [[y] for y in labels for _ in range(body.n)] if labels else [[] for _ in range(body.n)]
    seed = first_seed(body)
    spec = JobSpec(kind="generate", model=model.name,
                   images=[ImageSpec(seed=seed + k, labels=ys) for k, ys in enumerate(per_image)],
                   cfg_scale=model.defaults.guidance_scale if body.guidance_scale is None else body.guidance_scale,
                   sampler=sampler_spec(body, model), deadline=deadline(body, time.time()), format=body.format,
                   priority=body.priority)
    return await submit(request, state, spec, None, wait, options=body, inline=inline)
