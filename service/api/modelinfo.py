"""What the API knows about the served model: sizes, classes and sampler defaults, without its weights.

The API never runs the network, so it reads only the checkpoint's description: a safetensors file
written by ``eqm convert`` (or the bundled digits model) carries its config and class names in the
header, read without loading a tensor; any other checkpoint is loaded on the CPU once to infer its
config from the tensor shapes (convert it to safetensors to make API start-up instant).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models import describe_model, resolve_checkpoint
from models.family import SamplingDefaults
from models.files import CheckpointError
from service.classnames import ClassIndex
from service.jobstore import check_model_name
from service.settings import Settings

SD_VAE_DOWNSAMPLE = 8            # stabilityai/sd-vae-ft-ema: 256 px <-> 32x32 latents


@dataclass(frozen=True)
class ModelInfo:
    name: str                     # public name; the workers use the same (EQM_MODEL_NAME or the file's stem)
    source: str
    config: object                # the family's architecture (in_channels, input_size, num_classes)
    codec: str                    # "identity" (pixel space) or "sd-vae" (latents)
    guidance_mode: str
    image_size: int               # pixels per side of the images in and out
    channels: int                 # 1 = grey, 3 = RGB
    classes: ClassIndex
    defaults: SamplingDefaults
    energy_form: str = "none"     # "none" = no energy (gradient-norm score); else the family's energy form

    @property
    def has_energy(self) -> bool:
        return self.energy_form != "none"

    @property
    def samplers(self) -> list[str]:
        """The samplers a request may ask of this model: heun-sde clamps to [-1, 1], pixel-space models only."""
        return ["nag", "gd", "heun-sde"] if self.codec == "identity" else ["nag", "gd"]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)


def model_name(settings: Settings, checkpoint: str | None = None) -> str:
    """The name workers report for the same settings (``service.worker.build_engine``): ``model_name`` when
    one model is served, else each checkpoint's file stem (``digits``, ``digits-e``, ...)."""
    checkpoint = checkpoint or settings.served_checkpoints[0]
    if settings.model_name and len(settings.served_checkpoints) == 1:
        return settings.model_name
    return Path(checkpoint).stem


def load_model_infos(settings: Settings) -> dict[str, ModelInfo]:
    """Every served model's description by name, the default first; two checkpoints with one name are refused."""
    out: dict[str, ModelInfo] = {}
    for checkpoint in settings.served_checkpoints:
        info = load_model_info(settings, checkpoint)
        try:
            check_model_name(info.name)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if info.name in out:
            raise CheckpointError(f"two served checkpoints are both named {info.name!r} ({out[info.name].source} and "
                                  f"{info.source}); rename one file: a model's name is its file's stem")
        out[info.name] = info
    return out


def load_model_info(settings: Settings, checkpoint: str | None = None) -> ModelInfo:
    """Read a served checkpoint's description (default: the first); a ``CheckpointError`` says what is wrong."""
    checkpoint = checkpoint or settings.served_checkpoints[0]
    path = resolve_checkpoint(checkpoint)
    if not path.is_file():
        hint = " (the bundled model ships with the package: reinstall it)" if checkpoint == "digits" else ""
        raise CheckpointError(f"{path}: no such checkpoint file{hint}; set EQM_CHECKPOINT to a model file")
    desc = describe_model(path, ebm=settings.ebm or None)
    config = desc.config
    if desc.codec == "sd-vae":
        image_size, channels = config.input_size * SD_VAE_DOWNSAMPLE, 3
    else:
        image_size, channels = config.input_size, config.in_channels
    return ModelInfo(
        name=model_name(settings, checkpoint), source=str(path), config=config, codec=desc.codec,
        guidance_mode=desc.guidance_mode, image_size=image_size, channels=channels,
        classes=ClassIndex.for_model(config.num_classes, desc.class_names),
        defaults=desc.defaults, energy_form=desc.energy_form)
