"""``GET /v1/models``: the served model, its classes, sampler defaults and request limits."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import ApiState, get_state, require_api_key
from service.api.schemas import MAX_COMPOSITION_LABELS, ModelCard, ModelDefaults, ModelLimits, ModelList, error_responses
from service.api.uploads import PREPROCESSING

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelList, summary="Served models, class names and defaults",
            responses=error_responses(401))
def list_models(state: ApiState = Depends(get_state)) -> ModelList:
    """What requests can ask for: class names (index = label), image size and channels, the sampler
    defaults a request gets for the options it leaves out, and the server's limits."""
    m, s = state.model, state.settings
    card = ModelCard(
        name=m.name, arch=m.config.arch, image_size=m.image_size, channels=m.channels,
        latent_shape=list(m.latent_shape), codec=m.codec, guidance_mode=m.guidance_mode,
        energy_form=m.energy_form,
        num_classes=m.num_classes, class_names=list(m.classes.names),
        defaults=ModelDefaults(**vars(m.defaults)),
        limits=ModelLimits(max_images_per_job=s.max_images_per_job, max_upload_bytes=s.max_upload_bytes,
                           max_upload_pixels=s.max_upload_pixels, max_composition_labels=MAX_COMPOSITION_LABELS),
        upload_preprocessing=f"{PREPROCESSING}; final size {m.image_size}x{m.image_size}, "
                             f"{'grey' if m.channels == 1 else 'RGB'}")
    return ModelList(models=[card])
