"""``GET /v1/models``: every served model, its classes, sampler defaults, limits and who serves it now."""
from __future__ import annotations

import redis
from fastapi import APIRouter, Depends

from service.api.deps import ApiState, get_state, require_api_key
from service.api.modelinfo import ModelInfo
from service.api.schemas import MAX_COMPOSITION_LABELS, ModelCard, ModelDefaults, ModelLimits, ModelList, error_responses
from service.api.uploads import PREPROCESSING, upload_pixel_limit
from service.jobstore import worker_serves

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelList, summary="Served models, class names, defaults and workers",
            responses=error_responses(401))
def list_models(state: ApiState = Depends(get_state)) -> ModelList:
    """What requests can ask for, one card per model (the default first; a request names one in ``model``):
    class names (index = label), image size and channels, the sampler defaults a request gets for the
    options it leaves out, the samplers it takes, the server's limits, and, read from Redis now, the live
    workers serving it, its queue depth and whether a worker holds it loaded."""
    try:
        workers = list(state.store.live_workers(state.settings.heartbeat_s).values())
        depths = {name: state.store.queue_depth(name) for name in state.models}
    except redis.RedisError:                    # the description still helps a client while Redis is down
        workers, depths = [], {}
    return ModelList(models=[_card(m, state, workers, depths.get(m.name, 0)) for m in state.models.values()])


def _card(m: ModelInfo, state: ApiState, workers: list[dict], depth: int) -> ModelCard:
    s = state.settings
    serving = [w for w in workers if worker_serves(w, m.name)]
    return ModelCard(
        name=m.name, arch=m.config.arch, image_size=m.image_size, channels=m.channels,
        latent_shape=list(m.latent_shape), codec=m.codec, guidance_mode=m.guidance_mode,
        energy_form=m.energy_form,
        num_classes=m.num_classes, class_names=list(m.classes.names),
        defaults=ModelDefaults(**vars(m.defaults)),
        limits=ModelLimits(max_images_per_job=s.max_images_per_job, max_upload_bytes=s.max_upload_bytes,
                           max_upload_pixels=upload_pixel_limit(m.image_size, s.max_upload_pixels),
                           max_composition_labels=MAX_COMPOSITION_LABELS),
        upload_preprocessing=f"{PREPROCESSING}; final size {m.image_size}x{m.image_size}, "
                             f"{'grey' if m.channels == 1 else 'RGB'}",
        default=m is state.model, samplers=m.samplers, workers=len(serving), queue_depth=depth,
        loaded=any(m.name in (w.get("loaded") or w.get("models") or [w.get("model")]) for w in serving))
