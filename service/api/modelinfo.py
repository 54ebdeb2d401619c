"""What the API knows about the served model: sizes, classes and sampler defaults, without its weights.

The API never runs the network, so it reads only the checkpoint's description: a safetensors file
written by ``eqm convert`` (or the bundled digits model) carries its config and class names in the
header, read without loading a tensor; any other checkpoint is loaded on the CPU once to infer its
config from the tensor shapes (convert it to safetensors to make API start-up instant).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from models import resolve_checkpoint
from models.checkpoint import CheckpointError, infer_config, read_state_dict
from models.eqm import EqMConfig
from models.family import ENERGY_FORMS
from models.sampler import SamplerParams
from service.classnames import ClassIndex
from service.settings import Settings

SD_VAE_DOWNSAMPLE = 8            # stabilityai/sd-vae-ft-ema: 256 px <-> 32x32 latents
PAPER_GUIDANCE_SCALE = 1.5       # the paper's headline setting (EqM-XL/2, FID 1.90)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for every option it leaves out."""

    sampler: str
    step_size: float
    mu: float
    max_steps: int
    grad_norm_threshold: float
    guidance_scale: float
    composition_guidance_scale: float
    denoise_max_steps: int
    epsilon_max: float = 0.0          # heun-sde settings (Energy Matching models)
    time_cutoff: float = 1.0


@dataclass(frozen=True)
class ModelInfo:
    name: str                     # public name; the workers use the same (EQM_MODEL_NAME or the file's stem)
    source: str
    config: EqMConfig
    codec: str                    # "identity" (pixel space) or "sd-vae" (latents)
    guidance_mode: str
    image_size: int               # pixels per side of the images in and out
    channels: int                 # 1 = grey, 3 = RGB
    classes: ClassIndex
    defaults: SamplingDefaults
    energy_form: str = "none"     # "none" = implicit EqM (gradient-norm score); dot | l2 | mean = EqM-E (energy)

    @property
    def has_energy(self) -> bool:
        return self.energy_form != "none"

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)


def model_name(settings: Settings) -> str:
    """The name workers report for the same settings (``service.worker.build_engine``)."""
    return settings.model_name or Path(settings.checkpoint).stem


def load_model_info(settings: Settings) -> ModelInfo:
    """Read the served checkpoint's description; a ``CheckpointError`` says what is wrong with it."""
    path = resolve_checkpoint(settings.checkpoint)
    if not path.is_file():
        hint = " (the bundled model ships with the package: reinstall it)" if settings.checkpoint == "digits" else ""
        raise CheckpointError(f"{path}: no such checkpoint file{hint}; set EQM_CHECKPOINT to a model file")
    meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    energy = _energy_matching_info(settings, path, meta)
    if energy is not None:
        return energy
    if "config" in meta:
        raw = json.loads(meta["config"])
        known = {f.name for f in fields(EqMConfig)}
        config = EqMConfig(**{k: v for k, v in raw.items() if k in known})
    else:
        state, meta = read_state_dict(path)
        config = infer_config(state, str(path))
        del state
    codec = meta.get("codec", "sd-vae" if config.in_channels == 4 else "identity")
    if codec == "sd-vae":
        image_size, channels = config.input_size * SD_VAE_DOWNSAMPLE, 3
    else:
        image_size, channels = config.input_size, config.in_channels
    names = tuple(json.loads(meta["class_names"])) if "class_names" in meta else ()
    recorded = meta.get("ebm")
    if settings.ebm and recorded and settings.ebm != recorded:
        raise CheckpointError(f"{path}: was trained with --ebm {recorded}, not {settings.ebm}; unset EQM_EBM / --ebm")
    if settings.ebm and settings.ebm not in ENERGY_FORMS:
        raise CheckpointError(f"unknown energy form EQM_EBM={settings.ebm!r}; choose one of {', '.join(ENERGY_FORMS)}")
    return ModelInfo(
        name=model_name(settings), source=str(path), config=config, codec=codec,
        guidance_mode=meta.get("guidance_mode", "official"), image_size=image_size, channels=channels,
        classes=ClassIndex.for_model(config.num_classes, names),
        defaults=_defaults_for(config, json.loads(meta.get("sampler_defaults", "{}"))),
        energy_form=recorded or settings.ebm or "none")


def _energy_matching_info(settings: Settings, path: Path, meta: dict[str, str]) -> ModelInfo | None:
    """An Energy Matching model (pixel space, unconditional, the Heun SDE sampler), or None for EqM files."""
    from models.em_checkpoint import infer_config, looks_like_energy_matching, pick_weights, read_file
    from models.energy_matching import EnergyMatchingConfig
    if path.suffix == ".safetensors":
        if not looks_like_energy_matching({}, meta):
            return None
        config = EnergyMatchingConfig.from_dict(json.loads(meta["config"]))
    else:
        from models.em_checkpoint import is_energy_matching_file
        if not is_energy_matching_file(path):
            return None
        obj, meta = read_file(path)
        config = infer_config(pick_weights(obj, "ema", str(path)), str(path))
        del obj
    rec = {"dt": 0.01, "max_steps": 325, "epsilon_max": 0.01, "time_cutoff": 1.0, "grad_norm_threshold": 0.0,
           **json.loads(meta.get("sampler_defaults", "{}"))}            # official CIFAR-10 setting by default
    defaults = SamplingDefaults(sampler="heun-sde", step_size=float(rec["dt"]), mu=0.0, max_steps=int(rec["max_steps"]),
                                grad_norm_threshold=float(rec["grad_norm_threshold"]), guidance_scale=1.0,
                                composition_guidance_scale=1.0, denoise_max_steps=int(rec["max_steps"]),
                                epsilon_max=float(rec["epsilon_max"]), time_cutoff=float(rec["time_cutoff"]))
    return ModelInfo(name=model_name(settings), source=str(path), config=config, codec="identity", guidance_mode="all",
                     image_size=config.input_size, channels=config.in_channels, classes=ClassIndex.for_model(0, ()),
                     defaults=defaults, energy_form="potential")


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None


def _defaults_for(config: EqMConfig, recorded: dict) -> SamplingDefaults:
    """The checkpoint's recorded settings (``eqm sample`` uses the same) > the digits model's > the paper's."""
    from models.digits import DIGITS_DEFAULTS, digits_config
    p = SamplerParams()      # the paper's EqM-XL/2 setting: NAG-GD, eta 0.0017, mu 0.3, 249 updates
    base = dict(sampler=p.sampler, step_size=p.step_size, mu=p.mu, max_steps=p.max_steps,
                grad_norm_threshold=p.grad_norm_threshold, cfg_scale=PAPER_GUIDANCE_SCALE)
    composition_scale, denoise_steps = PAPER_GUIDANCE_SCALE, None
    if config.arch == digits_config().arch:
        d = DIGITS_DEFAULTS
        base.update(asdict(d.adaptive()), cfg_scale=d.cfg_scale)
        composition_scale, denoise_steps = d.composition_cfg_scale, d.denoise_steps
    base.update({k: v for k, v in recorded.items() if k in base})
    return SamplingDefaults(sampler=base["sampler"], step_size=float(base["step_size"]), mu=float(base["mu"]),
                            max_steps=int(base["max_steps"]), grad_norm_threshold=float(base["grad_norm_threshold"]),
                            guidance_scale=float(base["cfg_scale"]), composition_guidance_scale=composition_scale,
                            denoise_max_steps=denoise_steps or int(base["max_steps"]))
