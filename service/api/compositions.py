"""``POST /v1/compositions``: images that satisfy several classes at once (summed gradient fields)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request

from service.api.conventions import client_options
from service.api.deps import ApiState, get_state, require_api_key
from service.api.generations import WAIT_DOC
from service.api.schemas import CompositionRequest, JobCreated, JobStatus, error_responses
from service.api.submit import (check_image_count, deadline, field_error, first_seed, resolve_labels,
                                sampler_spec, submit)
from service.api.uploads import LimitedBodyRoute
from service.jobstore import ImageSpec, JobSpec

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=LimitedBodyRoute, dependencies=[Depends(require_api_key)])


@router.post("/compositions", status_code=202, response_model=JobCreated,
             summary="Compose classes: descend the weighted sum of their gradient fields",
             responses={200: {"model": JobStatus, "description": "with ?wait=true: the finished job"},
                        **error_responses(400, 401, 404, 413, 422, 429, 503)})
async def create_composition(body: CompositionRequest, request: Request,
                             wait: bool = Query(False, description=WAIT_DOC), state: ApiState = Depends(get_state),
                             inline: bool = Depends(client_options)):
    """Each of the ``n`` images follows ``g = u + s * sum_k w_k (c_k - u)``: ``c_k`` the field of label k,
    ``u`` the unconditional one, ``s`` the guidance scale, ``w_k`` the weights (default 1/K); with
    ``"mode": "sum"`` it follows the paper's ``g = sum_k w_k c_k`` (default weights 1) instead."""
    model = state.pick_model(body.model)
    labels = resolve_labels(body.labels, model, ("body", "labels"))
    if body.weights is not None and len(body.weights) != len(labels):
        raise field_error(("body", "weights"), f"{len(body.weights)} weights given for {len(labels)} labels: "
                                               f"give one per label, or none for 1/K each")
    check_image_count(body.n, state, ("body", "n"), f"n = {body.n}")
    seed = first_seed(body)
    weights = list(body.weights) if body.weights is not None else None
    scale = model.defaults.composition_guidance_scale if body.guidance_scale is None else body.guidance_scale
    spec = JobSpec(kind="compose", model=model.name,
                   images=[ImageSpec(seed=seed + k, labels=list(labels), weights=weights) for k in range(body.n)],
                   cfg_scale=scale, sampler=sampler_spec(body, model), deadline=deadline(body, time.time()),
                   format=body.format, priority=body.priority, compose_mode=body.mode)
    return await submit(request, state, spec, None, wait, options=body, inline=inline)
