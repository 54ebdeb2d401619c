"""Draw samples from a loaded model with any sampler settings, ready for the judge (``models/judge.py``).

Settings are the model's recorded defaults (its weights file's ``sampler_defaults``) with overrides on
top, so "the defaults" always means what a user of the service gets. Sample ``i`` starts from the noise of
seed ``seed + i``; class-conditional draws go through the labels in turn (0, 1, ..., 9, 0, ...).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from .family import LoadedModel
from .sampler import Condition, SamplerParams, noise_for_seed, sample

SETTING_NAMES = tuple(f.name for f in fields(SamplerParams)) + ("cfg_scale",)


@dataclass
class Drawn:
    """Samples and what they cost."""

    images: torch.Tensor        # (N, C, H, W) float32 in [-1, 1] (before the uint8 round trip)
    labels: np.ndarray          # (N,) requested class, -1 = unconditional
    mean_nfe: float             # forward rows per image (guidance rows and the stopping check included)
    mean_steps: float           # updates per image (Heun steps for the SDE sampler)
    seconds: float
    settings: dict


def settings_for(loaded: LoadedModel, overrides: dict | None = None) -> dict:
    """The model's recorded defaults with ``overrides`` on top (unknown names are an error)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown sampler setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
    recorded = {k: v for k, v in loaded.spec.sampler_defaults.items() if k in SETTING_NAMES}
    return {"cfg_scale": 1.0, **recorded, **overrides}


def split_settings(settings: dict) -> tuple[SamplerParams, float]:
    params = {k: v for k, v in settings.items() if k != "cfg_scale"}
    return SamplerParams(**params), float(settings.get("cfg_scale", 1.0))


def draw(loaded: LoadedModel, overrides: dict | None = None, *, per_class: int = 0, unconditional: int = 0,
         seed: int = 1000) -> Drawn:
    """``per_class`` samples of every class (a model with classes) plus ``unconditional`` ones."""
    settings = settings_for(loaded, overrides)
    params, cfg_scale = split_settings(settings)
    field_ = loaded.field
    classes = field_.num_classes
    if per_class > 0 and classes == 0:
        raise ValueError(f"{loaded.source}: an unconditional model; ask for unconditional samples instead")
    labels = [k % classes for k in range(per_class * classes)] + [-1] * unconditional
    if not labels:
        raise ValueError("nothing to draw: give per_class > 0 or unconditional > 0")
    conditions = [Condition(labels=(y,), cfg_scale=cfg_scale) if y >= 0 else Condition() for y in labels]
    start = torch.stack([noise_for_seed(seed + i, field_.sample_shape) for i in range(len(labels))])
    stats: dict = {}
    t0 = time.perf_counter()
    result = sample(field_, start, conditions, params, null_label=field_.null_label,
                    guided_channels=loaded.spec.guided_channels, stats=stats,
                    seeds=[seed + i for i in range(len(labels))])
    seconds = time.perf_counter() - t0
    n = len(labels)
    return Drawn(images=result.latents, labels=np.asarray(labels), mean_nfe=stats["nfe"] / n,
                 mean_steps=float(np.mean(result.steps)), seconds=seconds, settings=settings)
